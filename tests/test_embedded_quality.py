"""The shipped embedded model, through the public pipeline on the CPU, judged by the shapes-world evaluator.

Held-out prompts (colour/shape pairs never seen in training) and held-out edits. The assertions cover what the
shipped weights do reliably (bench/EMBEDDED_MODEL.md: 93% exactly right on 100 held-out one-object prompts, 82%
of edits; on these 6 + 6 prompts and 4 edits on this CPU every sample was exactly right), with one sample of
margin: every attribute but the shape on every text-to-image sample, most samples exactly right (shape
included), and most edits exactly right. A broken loader, text encoder, schedule or decoder makes the evaluator
parse noise or the wrong scene and fails them.
"""

from __future__ import annotations

import pytest
import torch

from fluxrt.pipeline import Pipeline
from fluxrt.train.evaluate import heldout_sets
from fluxrt.world import score
from fluxrt.world.evaluate import parse_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def verdicts():
    torch.manual_seed(0)
    pipe = Pipeline.load(device="cpu")
    sets = heldout_sets(6, 256)
    out = {}
    for name, n in (("t2i_single", 6), ("t2i_double", 6), ("edit", 4)):
        items = sets[name][:n]
        images = pipe.generate([s for s, _ in items], 256, 256, 24, 4.0, max_batch=8)
        out[name] = [score(parse_image(im), target) for im, (_, target) in zip(images, items)]
    return out


@pytest.mark.parametrize("name", ["t2i_single", "t2i_double"])
def test_text_to_image_follows_held_out_prompts(verdicts, name):
    rows = verdicts[name]
    for attribute in ("background", "count", "colour", "size", "position"):
        assert all(r[attribute] == 1.0 for r in rows), (attribute, rows)
    assert sum(r["exact"] for r in rows) >= len(rows) - 1, rows  # held-out shapes too


def test_edits_are_applied_and_keep_the_scene(verdicts):
    rows = verdicts["edit"]
    assert all(r["background"] and r["colour"] == 1.0 for r in rows), rows
    assert sum(r["exact"] for r in rows) >= 3, rows

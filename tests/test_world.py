"""Tests for the shapes world (fluxrt.world): sampling, captions, tasks, evaluator."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from fluxrt.world import (BACKGROUNDS, CELLS, COLOURS, EDIT_KINDS, HELD_OUT_PAIRS, SHAPES,
                          TRAIN_PAIRS, ComposeTask, EditTask, Scene, SceneObject, caption,
                          degrade, edit_preserved, is_held_out, label_components, match_objects,
                          parse_image, render, sample_captioned, sample_compose, sample_edit,
                          sample_scene, scene_in_split, score)
from fluxrt.world.scene import BACKGROUND_WORDS, CELL_WORDS, SHAPE_WORDS, SIZE_WORDS


# --------------------------------------------------------------------------
# Test-only caption reader: proves captions fully determine the scene.
# --------------------------------------------------------------------------

def _vocab() -> dict[tuple[str, ...], tuple[str, object]]:
    vocab: dict[tuple[str, ...], tuple[str, object]] = {}
    for name, words in SIZE_WORDS.items():
        vocab.update({(w,): ("size", name) for w in words})
    for name, words in SHAPE_WORDS.items():
        vocab.update({(w,): ("shape", name) for w in words})
    vocab.update({(c,): ("colour", c) for c in COLOURS})
    for name, words in BACKGROUND_WORDS.items():
        vocab.update({(w,): ("background", name) for w in words})
    for cell, words in CELL_WORDS.items():
        vocab.update({tuple(w.split()): ("cell", cell) for w in words})
    return vocab


VOCAB = _vocab()
MAX_PHRASE = max(len(k) for k in VOCAB)


def _tokens(text: str) -> list[tuple[str, object]]:
    """Longest-match vocabulary tokens of ``text`` (other words ignored)."""
    words = re.sub(r"[^a-z0-9\- ]", " ", text.lower()).split()
    out, i = [], 0
    while i < len(words):
        for n in range(MAX_PHRASE, 0, -1):
            if tuple(words[i:i + n]) in VOCAB:
                out.append(VOCAB[tuple(words[i:i + n])])
                i += n
                break
        else:
            i += 1
    return out


def read_caption(text: str) -> Scene:
    """Rebuild a scene from a caption whose objects are described contiguously."""
    background, objects, cur = None, [], {}
    for kind, value in _tokens(text):
        if kind == "background":
            assert background is None, text
            background = value
            continue
        assert kind not in cur, f"attribute {kind} repeated before object complete: {text}"
        cur[kind] = value
        if len(cur) == 4:
            objects.append(SceneObject(cur["shape"], cur["colour"], cur["size"], cur["cell"]))
            cur = {}
    assert not cur and background is not None, text
    return Scene(background, tuple(objects))


# --------------------------------------------------------------------------
# Data model, determinism, serialisation
# --------------------------------------------------------------------------

def test_palettes_are_separable():
    obj = np.array(list(COLOURS.values()), float)
    bg = np.array(list(BACKGROUNDS.values()), float)
    assert len(COLOURS) >= 8 and not set(COLOURS) & set(BACKGROUNDS)
    d_obj = np.linalg.norm(obj[:, None] - obj[None], axis=-1) + 1e9 * np.eye(len(obj))
    assert d_obj.min() >= 90
    assert np.linalg.norm(obj[:, None] - bg[None], axis=-1).min() >= 90


def test_sampling_is_deterministic():
    for seed in range(20):
        assert sample_scene(seed) == sample_scene(seed)
        assert sample_captioned(seed) == sample_captioned(seed)
        assert sample_edit(seed) == sample_edit(seed)
        assert sample_compose(seed) == sample_compose(seed)
        scene = sample_scene(seed)
        assert caption(scene, seed) == caption(scene, seed)
        assert render(scene, 64).tobytes() == render(scene, 64).tobytes()
    assert len({sample_scene(s) for s in range(100)}) > 90


def test_scene_validation_and_canonical_order():
    a = SceneObject("circle", "red", "large", (0, 0))
    b = SceneObject("square", "blue", "small", (2, 2))
    assert Scene("gray", (b, a)) == Scene("gray", (a, b))
    assert hash(Scene("gray", (b, a))) == hash(Scene("gray", (a, b)))
    with pytest.raises(ValueError):
        Scene("gray", (a, a._replace(shape="square")))  # shared cell
    with pytest.raises(ValueError):
        Scene("gray", ())
    with pytest.raises(ValueError):
        Scene("gray", (a._replace(colour="mauve"),))
    with pytest.raises(ValueError):
        Scene("red", (b,))


def test_object_counts_and_cells():
    counts = set()
    for seed in range(200):
        s = sample_scene(seed, split="all")
        counts.add(len(s.objects))
        assert all(o.colour != s.background for o in s.objects)
    assert counts == {1, 2, 3}
    assert len(sample_scene(0, n_objects=3).objects) == 3


def test_serialisation_round_trip():
    for seed in range(10):
        s, e, c = sample_scene(seed), sample_edit(seed), sample_compose(seed)
        assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
        assert EditTask.from_dict(json.loads(json.dumps(e.to_dict()))) == e
        assert ComposeTask.from_dict(json.loads(json.dumps(c.to_dict()))) == c
        hash(e), hash(c)


def test_render_sizes():
    scene = sample_scene(3)
    for size in (64, 128, 256):
        img = render(scene, size)
        assert img.mode == "RGB" and img.size == (size, size)
        assert img.getpixel((0, 0)) == BACKGROUNDS[scene.background]


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------

def test_captions_fully_determine_scene():
    texts = set()
    for seed in range(300):
        scene, text = sample_captioned(seed, split="all")
        assert read_caption(text) == scene, text
        texts.add(text.split(" ")[0])
    assert len(texts) >= 4  # several templates in use


def test_captions_vary_with_seed():
    scene = sample_scene(7, n_objects=3)
    assert len({caption(scene, s) for s in range(30)}) > 20


# --------------------------------------------------------------------------
# Edit and composition tasks
# --------------------------------------------------------------------------

def _differences(a: Scene, b: Scene) -> tuple[set, set]:
    return set(a.objects) - set(b.objects), set(b.objects) - set(a.objects)


def _check_reference(task: EditTask, obj: SceneObject) -> None:
    pairs = [(o.colour, o.shape) for o in task.source.objects]
    assert pairs.count((obj.colour, obj.shape)) == 1
    assert obj.colour in task.instruction
    assert any(w in task.instruction for w in SHAPE_WORDS[obj.shape])


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_tasks_are_consistent(kind):
    for seed in range(60):
        t = sample_edit(seed, kind=kind, split="all")
        assert t.kind == kind and t.source != t.target
        gone, new = _differences(t.source, t.target)
        if kind == "background":
            assert t.source.objects == t.target.objects
            assert t.source.background != t.target.background
            assert any(w in t.instruction for w in BACKGROUND_WORDS[t.target.background])
            continue
        assert t.source.background == t.target.background
        if kind in ("recolour", "move"):
            (old,), (nw,) = gone, new
            _check_reference(t, old)
            changed = [f for f in SceneObject._fields if getattr(old, f) != getattr(nw, f)]
            assert changed == (["colour"] if kind == "recolour" else ["cell"])
            if kind == "recolour":
                assert [c for k, c in _tokens(t.instruction) if k == "colour"] == [old.colour,
                                                                                   nw.colour]
            else:
                assert t.source.object_at(nw.cell) is None
                assert [c for k, c in _tokens(t.instruction) if k == "cell"] == [nw.cell]
        elif kind == "add":
            assert not gone and len(new) == 1
            (nw,) = new
            assert read_caption(t.instruction + " on a gray background").objects == (nw,)
        elif kind == "remove":
            assert not new and len(gone) == 1
            _check_reference(t, next(iter(gone)))


def test_edit_kind_mix_and_phrasing():
    tasks = [sample_edit(s) for s in range(200)]
    assert {t.kind for t in tasks} == set(EDIT_KINDS)
    assert len({t.instruction.split()[0] for t in tasks}) >= 8


def test_compose_tasks():
    for seed in range(100):
        t = sample_compose(seed, split="all")
        assert 2 <= len(t.references) <= 3
        assert len(t.target.objects) == len(t.references)
        assert all(len(r.objects) == 1 for r in t.references)
        assert any(w in t.instruction for w in BACKGROUND_WORDS[t.target.background])
        for i, ref in enumerate(t.references, start=1):
            seg = t.instruction.split(f"image {i}")[1].split("image")[0]
            cell = next(v for k, v in _tokens(seg) if k == "cell")
            placed = t.target.object_at(cell)
            assert placed is not None and placed[:3] == ref.objects[0][:3]


# --------------------------------------------------------------------------
# Held-out split
# --------------------------------------------------------------------------

def test_held_out_rule():
    n = len(COLOURS) * len(SHAPES)
    assert 0.10 <= len(HELD_OUT_PAIRS) / n <= 0.15
    # Pinned so that the split never silently changes.
    assert HELD_OUT_PAIRS == {("green", "circle"), ("purple", "square"),
                              ("pink", "triangle"), ("red", "diamond")}
    # Balanced: one pair per shape, no colour twice, so no colour predicts a shape in training.
    assert sorted(s for _, s in HELD_OUT_PAIRS) == sorted(SHAPES)
    assert len({c for c, _ in HELD_OUT_PAIRS}) == len(HELD_OUT_PAIRS)
    for colour in COLOURS:
        assert len({s for c, s in TRAIN_PAIRS if c == colour}) >= len(SHAPES) - 1
    assert {c for c, _ in TRAIN_PAIRS} == set(COLOURS)
    assert {s for _, s in TRAIN_PAIRS} == set(SHAPES)
    assert is_held_out(SceneObject("circle", "green", "small", (0, 0)))
    assert not is_held_out(("green", "triangle"))


def test_splits_respected():
    for seed in range(150):
        assert scene_in_split(sample_scene(seed, split="train"), "train")
        assert scene_in_split(sample_scene(seed, split="heldout"), "heldout")
        for split in ("train", "heldout"):
            e, c = sample_edit(seed, split=split), sample_compose(seed, split=split)
            held_e = any(is_held_out(o) for s in (e.source, e.target) for o in s.objects)
            held_c = any(is_held_out(o) for s in c.references for o in s.objects)
            assert held_e == held_c == (split == "heldout")


# --------------------------------------------------------------------------
# Evaluator
# --------------------------------------------------------------------------

def test_label_components():
    mask = np.array([[1, 0, 0, 1],
                     [0, 1, 0, 1],
                     [0, 0, 0, 0],
                     [1, 1, 0, 1]], bool)
    labels, n = label_components(mask)
    assert n == 4
    assert labels[0, 0] == labels[1, 1] != 0  # diagonal = connected
    assert labels[0, 3] == labels[1, 3] != labels[0, 0]
    assert labels[3, 0] == labels[3, 1] != labels[3, 3]
    assert (labels > 0).sum() == mask.sum()


def _accuracy(size: int, n: int, start: int = 0, noisy: bool = False) -> float:
    exact = 0
    for seed in range(start, start + n):
        scene = sample_scene(seed, split="all")
        img = render(scene, size)
        if noisy:
            img = degrade(img, noise_sigma=8.0, blur_radius=0.7, seed=seed)
        exact += score(parse_image(img), scene)["exact"]
    return exact / n


def test_evaluator_exact_256():
    assert _accuracy(256, 500) >= 0.99


def test_evaluator_exact_64():
    assert _accuracy(64, 500, start=10_000) >= 0.98


def test_evaluator_exact_128_noisy_blurred():
    assert _accuracy(128, 200, start=20_000, noisy=True) >= 0.97


def test_evaluator_exact_64_and_256_noisy_blurred():
    assert _accuracy(64, 200, start=30_000, noisy=True) >= 0.97
    assert _accuracy(256, 60, start=40_000, noisy=True) >= 0.97


def test_evaluator_must_fail_on_wrong_image():
    for seed in range(30):
        scene = sample_scene(seed, split="all")
        obj = scene.objects[0]
        other = next(c for c in COLOURS if c != obj.colour)
        recoloured = scene.replace_objects([obj._replace(colour=other)] + list(scene.objects[1:]))
        s = score(parse_image(render(recoloured, 128)), scene)
        assert not s["exact"] and s["colour"] < 1 and s["shape"] == 1 and s["position"] == 1
        free = next(c for c in CELLS if scene.object_at(c) is None)
        moved = scene.replace_objects([obj._replace(cell=free)] + list(scene.objects[1:]))
        assert not score(parse_image(render(moved, 128)), scene)["exact"]


def test_edit_preserved():
    for seed in range(40):
        task = sample_edit(seed, split="all")
        assert edit_preserved(parse_image(render(task.target, 128)), task)
        assert not edit_preserved(parse_image(render(task.source, 128)), task)
    task = sample_compose(0)
    assert edit_preserved(parse_image(render(task.target, 128)), task)


def test_score_and_match_objects():
    scene = sample_scene(5, n_objects=2, split="all")
    extra_cell = next(c for c in CELLS if scene.object_at(c) is None)
    extra = SceneObject("square", "red", "small", extra_cell)
    s = score(Scene(scene.background, scene.objects + (extra,)), scene)
    assert not s["exact"] and not s["count"] and s["shape"] == 1.0
    pairs = match_objects(list(scene.objects) + [extra], list(scene.objects))
    assert (extra, None) in pairs and sum(p == t for p, t in pairs) == 2
    assert score(scene, scene)["exact"]


def test_parse_image_inputs_and_odd_images():
    scene = sample_scene(11, split="all")
    img = render(scene, 128)
    arr = np.asarray(img)
    assert parse_image(arr).to_scene() == scene
    assert parse_image(arr.astype(np.float32) / 255.0).to_scene() == scene
    assert parse_image(render(scene, 256), size_hint=128).to_scene() == scene
    empty = parse_image(Image.new("RGB", (64, 64), BACKGROUNDS["white"]))
    assert empty.background == "white" and empty.objects == ()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    parse_image(noise)  # must not raise

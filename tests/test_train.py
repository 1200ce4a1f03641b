"""The embedded model's trainer: stages run end to end at smoke scale and are reproducible from a seed."""

import pytest
import torch
from safetensors.torch import load_file

from fluxrt.config import SHAPES
from fluxrt.loading.checkpoint import load_transformer
from fluxrt.train import shapes
from fluxrt.train.flow import EMA, sample_t
from fluxrt.train.schedule import Budget


def _train(workdir, seed=0):
    shapes.main(["--workdir", str(workdir), "--scale", "smoke", "--device", "cpu", "--workers", "1",
                 "--seed", str(seed), "--stages", "text,vae,teacher,student,export"])  # fmt: skip


@pytest.mark.slow
def test_smoke_run_is_reproducible_and_exports_loadable_files(tmp_path):
    _train(tmp_path / "a")
    _train(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "flow.safetensors"), load_file(tmp_path / "b" / "flow.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, spec = load_transformer(tmp_path / "a" / "export" / "flow.safetensors", spec=SHAPES.name)
    assert spec.name == SHAPES.name and "guidance_in.in_layer.weight" in model.state_dict()
    assert (tmp_path / "a" / "export" / "text_encoder" / "tokenizer.json").exists()


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="nope"):
        shapes.main(["--workdir", str(tmp_path), "--stages", "text,nope", "--device", "cpu"])


def test_ema_warm_up_forgets_the_initialisation():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, 0.999)
    with torch.no_grad():
        m.weight.fill_(1.0)
    for _ in range(200):
        ema.update(m)
    assert torch.allclose(ema.model.weight, torch.ones(2, 2), atol=0.1)  # a plain 0.999 EMA would sit near 0.2


def test_training_times_follow_the_inference_shift():
    t = sample_t(20000, "cpu", torch.Generator().manual_seed(0), mu=1.8)
    assert 0 < t.min() and t.max() < 1
    assert (t > 0.99).float().mean() > 0.08  # the first sampling steps, where the prompt decides, are trained on
    assert (t < 0.5).float().mean() > 0.04  # and so are the late ones


def test_budget_shrinks_to_the_time_left():
    b = Budget(steps=10**9, seconds=0.0, probe=2, skip=1)
    for s in range(2):
        b.update(s)
    assert b.total <= 2


def test_budget_ignores_slow_first_steps():
    import time

    b = Budget(steps=10**9, seconds=1.0, probe=4, skip=2)
    b.update(0)
    time.sleep(0.3)  # a slow start-up step
    for s in range(1, 4):
        b.update(s)
    assert b.total > 1000  # the fast steps set the pace: ~0.7 s left at ~0 s per step

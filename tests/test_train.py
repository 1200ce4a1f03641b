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
    # Running the student stage again resumes from the saved student and goes on training it.
    shapes.main(["--workdir", str(tmp_path / "a"), "--scale", "smoke", "--device", "cpu", "--workers", "1",
                 "--stages", "student"])  # fmt: skip
    assert "student: resuming from flow.safetensors" in (tmp_path / "a" / "log.txt").read_text()
    c = load_file(tmp_path / "a" / "flow.safetensors")
    assert c.keys() == a.keys() and not all(torch.equal(a[k], c[k]) for k in a)


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


def _latent_set(n=12, side=2, dim=8, txt=3, ctx_dim=5):
    from fluxrt.train.flow import LatentSet

    idx = torch.arange(n)
    groups = {0: (idx, torch.zeros(n, 0, dtype=torch.long), idx), 2: (idx, torch.stack([idx, idx.flip(0)], 1), idx)}
    return LatentSet(torch.randn(n, side * side, dim), torch.randn(n, txt, ctx_dim), torch.randn(1, txt, ctx_dim),
                     groups, side, 1.0)  # fmt: skip


def test_warm_up_batches_match_training_batches_in_layout():
    """torch.compile specialises on shapes and strides: the warm-up's batch of each reference count must be laid
    out exactly like the ones training draws, or every graph compiles a second time inside the timed budget."""
    from fluxrt.train.flow import teacher_batch

    data = _latent_set()
    gen, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    seen = {}
    for _ in range(20):
        drawn = teacher_batch(data, 4, gen, noise, 0.5)
        seen[drawn[0]] = drawn
    assert set(seen) == {0, 2}
    for n_refs, drawn in seen.items():
        forced = teacher_batch(data, 4, gen, noise, 0.5, n_refs)
        assert forced[0] == n_refs
        for a, b in zip(drawn[1:], forced[1:]):
            assert (a is None) == (b is None)
            if a is not None:
                assert (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)


def test_vae_stage_trains_again_when_held_out_mse_is_over_the_bar_and_keeps_the_best(tmp_path, monkeypatch):
    import re

    from fluxrt.models.autoencoder import AutoEncoder
    from fluxrt.train import vae

    clips = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, c: clips.append(c) or real_clip(p, c))
    shapes.main(["--workdir", str(tmp_path), "--scale", "smoke", "--device", "cpu", "--workers", "1",
                 "--stages", "vae", "--set", "vae_max_mse=0,vae_tries=2,vae_clip=0.5"])  # fmt: skip
    log = (tmp_path / "log.txt").read_text()
    scores = [(float(m), int(s)) for m, s in re.findall(r"held-out reconstruction MSE ([\d.]+) \(seed (\d)\)", log)]
    assert [s for _, s in scores] == [0, 1] and "training again" in log and "keeping the best run" in log
    assert clips and set(clips) == {0.5}  # every VAE step clipped at vae_clip
    ae = AutoEncoder(SHAPES.autoencoder)
    ae.load_state_dict(load_file(tmp_path / "ae.safetensors"))
    run = shapes.Run(tmp_path, torch.device("cpu"), shapes.SCALES["smoke"])
    n = run.scale["vae_images"]
    held = run.images(n + run.scale["vae_held"])[n:]
    assert vae.reconstruction_mse(ae.eval(), held) == pytest.approx(min(m for m, _ in scores), abs=1e-5)


def test_set_overrides_numbers_of_the_scale(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(shapes, "stage_text", lambda run: seen.update(run.scale))
    shapes.main(["--workdir", str(tmp_path), "--scale", "smoke", "--device", "cpu", "--stages", "text",
                 "--set", "student_lr=5e-4,batch=2"])  # fmt: skip
    assert seen["student_lr"] == 5e-4 and seen["batch"] == 2 and seen["lr"] == shapes.SCALES["smoke"]["lr"]
    with pytest.raises(SystemExit, match="'nope'"):
        shapes.main(["--workdir", str(tmp_path), "--stages", "text", "--set", "nope=1"])
    with pytest.raises(SystemExit, match="'fast' is not a float"):
        shapes.main(["--workdir", str(tmp_path), "--stages", "text", "--set", "student_lr=fast"])
    with pytest.raises(SystemExit, match="not a number of the scale"):
        shapes.main(["--workdir", str(tmp_path), "--stages", "text", "--set", "teacher=5"])  # a (steps, s) pair


def _tiny_flow(guidance: bool):
    from fluxrt.config import TransformerConfig
    from fluxrt.models.transformer import Flux2

    torch.manual_seed(0)
    cfg = TransformerConfig(in_channels=8, context_in_dim=5, hidden_size=16, num_heads=2, depth=1,
                            depth_single_blocks=1, axes_dim=(2, 2, 2, 2), use_guidance_embed=guidance)  # fmt: skip
    return Flux2(cfg)


def test_compiled_distillation_compiles_each_graph_once(monkeypatch):
    """The compiled student step (teacher no-grad forward + student training forward, per reference count) is
    warmed up on batches laid out like training's, so no step of the budget recompiles."""
    import functools

    from torch._dynamo.utils import counters

    from fluxrt.train import flow

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    teacher, student = _tiny_flow(False), _tiny_flow(True)
    flow.distill_student(student, teacher, _latent_set(), Budget(12), batch=3, log=lambda m: None, compile=True,
                         recipe=flow.DistillRecipe(focus=2.0, g_fixed_frac=0.5, ref_boost=3.0))  # fmt: skip
    assert counters["stats"]["unique_graphs"] == 8  # {double, single block} x {teacher, student} x {0, 2 refs}
    torch._dynamo.reset()


def test_distillation_recipe_draws_guidance_and_groups_as_asked():
    from fluxrt.train.flow import DistillRecipe, student_batch

    data = _latent_set()
    gen, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    recipe = DistillRecipe(g_range=(1.0, 2.0), g_fixed=4.0, g_fixed_frac=0.5, ref_boost=9.0)
    drawn = [student_batch(data, 64, gen, noise, recipe) for _ in range(40)]
    g = torch.cat([d[5] for d in drawn])
    assert 0.4 < (g == 4.0).float().mean() < 0.6 and ((g >= 1) & (g <= 2) | (g == 4)).all()
    assert sum(d[0] == 2 for d in drawn) >= 32  # equal-sized groups, the reference one boosted 9x: ~90%


def test_focus_weights_the_tokens_guidance_changes():
    """With focus, an error on the tokens where the teacher's c - u is large costs more than the same error
    elsewhere; without it, both cost the same."""
    from fluxrt.train import flow

    class Fixed(torch.nn.Module):  # the "teacher": cond differs from uncond on token 0 only; "student": zeros
        def forward(self, x, ids, t, ctx, ctx_ids, guidance=None):
            out = torch.zeros_like(x)
            if guidance is None:
                out[:, 0] = ctx[:, :1, :1].squeeze(-1)  # uncond (empty ctx = 0) vs cond (ctx = 1)
            return out

    data = _latent_set(ctx_dim=8)
    data.ctx.fill_(1.0)
    data.empty_ctx.zero_()
    drawn = (0, torch.zeros(2, 4, 8), None, torch.full((2,), 0.5), torch.ones(2, 3, 8), torch.full((2,), 1.0))
    plain = flow.distill_loss(Fixed(), Fixed(), data, drawn, flow.DistillRecipe())
    focused = flow.distill_loss(Fixed(), Fixed(), data, drawn, flow.DistillRecipe(focus=3.0))
    assert plain.item() == pytest.approx(1 / 4)  # error 1 on one token of four
    assert focused.item() == pytest.approx((1 + 3 * 4) / 4 / (1 + 3))  # that token weighs 1 + 3 * (1 / mean)


def test_budget_refits_when_steps_slow_down(monkeypatch):
    """Steps that get slower after the probe (a mix of batch shapes) are caught by the refits: the run ends near
    its budget instead of a third past it."""
    from fluxrt.train import schedule

    clock = [0.0]
    monkeypatch.setattr(schedule.time, "time", lambda: clock[0])
    b = Budget(steps=10**6, seconds=100.0, probe=4, skip=2)
    step = 0
    while b.running(step):
        clock[0] += 0.1 if step < 8 else 0.3  # 0.1 s per step while probed, then 0.3 s
        step = b.tick(step, lambda m: None, 10**9, lambda: "")
    assert 95 <= clock[0] <= 106 and step < 1000


@pytest.mark.parametrize("name,missed", [
    ("2026-11-26_h100_shapes_eval_student_v2.json", []),  # 5th session's student: every target, gap exactly 5 points
    ("2026-11-26_h100_shapes_eval.json", ["gap"]),  # 4th session: 8 and 12 points behind on edits, composition
    ("2026-11-26_h100_shapes_eval_one_command_run3.json", ["t2i_single", "t2i_double", "edit", "compose"]),
    ("2026-11-27_h100_shapes_eval_one_command_run4.json", ["gap"]),  # shipped weights, n = 100: composition -8
    ("2026-11-27_h100_shapes_eval400_run4.json", []),  # the same weights on 400 samples per set: -4 at most
])  # fmt: skip
def test_eval_verdict_on_recorded_runs(name, missed):
    import json

    from conftest import REPO_ROOT

    from fluxrt.train.evaluate import verdict

    res = json.loads((REPO_ROOT / "bench" / "results" / name).read_text())
    met = verdict(res["student"], res["teacher"])
    assert [k for k, ok in met.items() if not ok and k != "all"] == missed and met["all"] is (missed == [])


def test_gap_standard_error_shrinks_with_samples():
    from fluxrt.train.evaluate import gap_standard_errors

    s, t = {"compose": 0.79, "edit": 1.0}, {"compose": 0.87, "edit": 1.0}
    se100, se400 = gap_standard_errors(s, t, 100), gap_standard_errors(s, t, 400)
    assert se100["compose"] == pytest.approx(((0.79 * 0.21 + 0.87 * 0.13) / 100) ** 0.5)  # 0.0526
    assert se400["compose"] == pytest.approx(se100["compose"] / 2) and se100["edit"] == 0.0

"""fluxrt.accel.cache: the step cache skips later blocks only when asked, reuses what the last full step added,
starts each run afresh, and leaves the model as it was when removed. Tiny preset, fp32, CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import spawn_all, spawn_cpu, tiny_flow

from fluxrt.accel.cache import apply_step_cache, remove_step_cache
from fluxrt.accel.compile import compile_transformer
from fluxrt.sampling.run import sample

STEPS = 8


def _inputs(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, cfg.in_channels, 4, 6, generator=g), torch.randn(1, 12, cfg.context_in_dim, generator=g)


def _block_calls(model) -> list[int]:
    """Counts calls of the last single block (run only on full steps)."""
    calls = [0]
    model.single_blocks[-1].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def _sample(model, noise, ctx):
    return sample(model, noise, ctx, num_steps=STEPS, mode="embedded", guidance=4.0)


def test_tiny_threshold_reuses_nothing_and_matches_the_plain_model_bit_for_bit():
    model = tiny_flow(guidance_embed=True)
    noise, ctx = _inputs(model.cfg)
    plain = _sample(model, noise, ctx)
    state = apply_step_cache(model, 1e-12)
    calls = _block_calls(model)
    cached = _sample(model, noise, ctx)
    assert torch.equal(cached, plain)
    assert state.steps == STEPS and state.skipped == 0 and calls[0] == STEPS


def test_huge_threshold_runs_only_the_first_step_in_full_and_each_run_starts_afresh():
    model = tiny_flow(guidance_embed=True)
    noise, ctx = _inputs(model.cfg)
    plain = _sample(model, noise, ctx)
    state = apply_step_cache(model, 1e9)
    calls = _block_calls(model)
    first = _sample(model, noise, ctx)
    assert state.skipped == STEPS - 1 and calls[0] == 1
    assert not torch.allclose(first, plain, atol=1e-4)  # lossy: later blocks' output reused 7 times
    again = _sample(model, noise, ctx)  # a new run: its first step runs in full again, same result
    assert calls[0] == 2 and torch.equal(again, first)


def test_a_skipped_step_adds_what_the_later_blocks_added_at_the_last_full_step():
    """One forward in full at t, then one at t' with the cache: the output is the plain model's with its later
    blocks' contribution replaced by the one from t (checked by computing that by hand)."""
    model = tiny_flow(guidance_embed=True)
    noise, ctx = _inputs(model.cfg)
    from fluxrt.sampling.latents import grid_ids, pack, text_ids

    x, ids, ctx_ids, g = pack(noise), grid_ids(4, 6)[None], text_ids(12)[None], torch.full((1,), 4.0)
    state = apply_step_cache(model, 1e9)
    with torch.no_grad():
        model(x, ids, torch.full((1,), 0.9), ctx, ctx_ids, guidance=g)
        delta = state.delta.clone()
        cached = model(x * 0.9, ids, torch.full((1,), 0.8), ctx, ctx_ids, guidance=g)
        remove_step_cache(model)
        vec = model.embed_vec(torch.full((1,), 0.8), g, x.dtype)
        from fluxrt.models.attention import rope

        pe = rope(torch.cat([ctx_ids, ids], dim=1), model.cfg.axes_dim, model.cfg.theta)
        mods = model.modulations(vec)
        img_1, _ = model.double_blocks[0](model.img_in(x * 0.9), model.txt_in(ctx), pe, mods.img, mods.txt)
        by_hand = model.final_layer(img_1 + delta, vec)
    assert state.skipped == 1 and torch.allclose(cached, by_hand, atol=1e-6)


def test_moderate_threshold_skips_some_steps_and_stays_close():
    model = tiny_flow(guidance_embed=True)
    noise, ctx = _inputs(model.cfg)
    plain = _sample(model, noise, ctx)
    state = apply_step_cache(model, 1.0)  # the random tiny model's first block changes by 0.7-1.8 per step
    cached = _sample(model, noise, ctx)
    rel = ((cached - plain).norm() / plain.norm()).item()
    print(f"threshold 1.0: {state.skipped}/{state.steps} steps skipped, relative L2 {rel:.3e}")
    assert 0 < state.skipped < STEPS - 1 and 0 < rel < 0.5


def test_remove_restores_the_plain_forward_and_bad_thresholds_are_refused():
    model = tiny_flow(guidance_embed=True)
    noise, ctx = _inputs(model.cfg)
    plain = _sample(model, noise, ctx)
    apply_step_cache(model, 1e9)
    apply_step_cache(model, 1e9)  # applying twice replaces, does not stack
    remove_step_cache(model)
    assert "run_blocks" not in vars(model) and not model._forward_pre_hooks
    assert torch.equal(_sample(model, noise, ctx), plain)
    for bad, shown in ((0, "0"), (-0.1, "-0.1"), (float("nan"), "nan")):
        with pytest.raises(ValueError, match=shown):
            apply_step_cache(model, bad)
    with pytest.raises(ValueError, match="Linear"):
        apply_step_cache(torch.nn.Linear(2, 2), 0.1)


def test_cached_model_with_compiled_blocks_matches_the_eager_cached_model():
    model = tiny_flow(guidance_embed=True)
    noise, ctx = _inputs(model.cfg)
    apply_step_cache(model, 1.0)
    eager = _sample(model, noise, ctx)
    compile_transformer(model, backend="aot_eager")
    try:
        compiled = _sample(model, noise, ctx)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(compiled, eager, atol=1e-5)


def test_kv_steps_always_run_every_block():
    """klein 9B KV: reference K/V are read by every block at every step, so nothing is skipped."""
    from fluxrt.sampling.latents import grid_ids

    model = tiny_flow(guidance_embed=False)
    noise, ctx = _inputs(model.cfg)
    ref, ref_ids = torch.randn(1, 6, model.cfg.in_channels), grid_ids(2, 3, 10)[None]
    kw = {"num_steps": 4, "mode": "kv", "ref": ref, "ref_ids": ref_ids}
    plain = sample(model, noise, ctx, **kw)
    state = apply_step_cache(model, 1e9)
    assert torch.equal(sample(model, noise, ctx, **kw), plain) and state.skipped == 0 and state.steps == 3


def test_streamed_blocks_with_the_cache_give_the_resident_cached_result():
    """Block streaming (`--vram`/`--offload`) loads each block in its own pre-hook, so skipped blocks are simply not
    loaded: the image is the one the resident model makes with the same cache."""
    import copy

    from fluxrt.memory import stream_blocks

    model = tiny_flow(guidance_embed=True)
    noise, ctx = _inputs(model.cfg)
    streamed = stream_blocks(copy.deepcopy(model), "cpu", prefetch=1)
    apply_step_cache(model, 1.0)
    state = apply_step_cache(streamed, 1.0)
    assert torch.equal(_sample(streamed, noise, ctx), _sample(model, noise, ctx)) and state.skipped > 0


def _parallel_cached(plan: str) -> tuple[torch.Tensor, int, int]:
    """On each rank: the tiny model with the step cache under a parallel plan; rank 0's result is returned."""
    from fluxrt.parallel import BatchParallel, make_mesh, parallelize

    torch.set_num_threads(1)
    model = tiny_flow(guidance_embed=plan != "batch2")
    noise, ctx = _inputs(model.cfg)
    state = apply_step_cache(model, 1.0)
    if plan == "batch2":  # a CFG model: its two halves are one forward's two rows, one per rank
        wrapped = BatchParallel(model)
        out = sample(wrapped, noise, ctx, num_steps=STEPS, mode="cfg", guidance=4.0, neg_ctx=torch.zeros_like(ctx))
    else:
        wrapped = parallelize(model, make_mesh(*{"sp2": (2, 1), "tp2": (1, 2)}[plan]))
        out = _sample(wrapped, noise, ctx)
    assert getattr(wrapped, "step_cache", None) is state  # what Pipeline.run records
    return out, state.steps, state.skipped


@pytest.mark.parametrize("plan", ["sp2", "tp2", "batch2"])
def test_parallel_ranks_skip_the_same_steps_as_one_process(plan):
    """Each rank holds part of the tokens (SP) or rows (batch): they decide together, so the ranks skip exactly the
    steps one process skips and the image matches it (fp32 tolerance of the parallel plans)."""
    out, steps, skipped = spawn_cpu(2, _parallel_cached, plan)
    model = tiny_flow(guidance_embed=plan != "batch2")
    noise, ctx = _inputs(model.cfg)
    state = apply_step_cache(model, 1.0)
    if plan == "batch2":
        ref = sample(model, noise, ctx, num_steps=STEPS, mode="cfg", guidance=4.0, neg_ctx=torch.zeros_like(ctx))
    else:
        ref = _sample(model, noise, ctx)
    assert (steps, skipped) == (state.steps, state.skipped) and 0 < skipped < STEPS - 1
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def _decide(group_on: bool) -> bool:
    """Rank r's image rows: rank 0's changed by 1% since the last full step, rank 1's by 40%, rank 1's rows ten
    times smaller, so together they changed by 4.5%."""
    import torch.distributed as dist

    from fluxrt.accel.cache import StepCache

    rank = dist.get_rank()
    prev = torch.full((1, 4, 8), 1.0 if rank == 0 else 0.1)
    now = prev * (1.01 if rank == 0 else 1.4)
    state = StepCache(0.1, residual=prev, group=dist.group.WORLD if group_on else None)
    return state.reusable(now)


def test_ranks_decide_from_the_sums_over_the_group():
    assert spawn_all(2, _decide, True, timeout_s=60) == [True, True]  # 4.5% < 10% on both
    assert spawn_all(2, _decide, False, timeout_s=60) == [True, False]  # alone they disagree

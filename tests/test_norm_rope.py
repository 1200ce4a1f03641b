"""QK-norm + RoPE: the model's dispatch point and the fused Triton kernel (fluxrt.accel.norm_rope).

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, in a child process: the variable must be
set before Triton compiles anything). The interpreter truncates fp32 -> bf16 conversions, so its exact checks are
in fp32; bf16 against the reference is checked on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fluxrt.models import attention as A
from fluxrt.models.transformer import split_heads
from fluxrt.sampling.latents import grid_ids

triton = pytest.importorskip("triton", reason="the fused kernel needs Triton (the test extra installs it)")

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def _table(B, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (B, L, 4), generator=g)
    return A.rope(ids, (D // 4,) * 4, 2000)


def test_dispatch_defaults_to_the_reference_ops_and_names_unknown_kernels():
    B, H, L, D = 1, 2, 5, 8
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    qs, ks, pe = torch.rand(D) + 0.5, torch.rand(D) + 0.5, _table(B, L, D)
    assert A.norm_rope_kernel_name() == "reference"
    got = A.qk_norm_rope(q, k, qs, ks, pe)
    assert torch.equal(got[0], A.apply_rope(A.rms_norm(q, qs), pe))
    assert torch.equal(got[1], A.apply_rope(A.rms_norm(k, ks), pe))
    with pytest.raises(ValueError, match="'nope'.*reference"):
        A.set_norm_rope_kernel("nope")


def test_kernel_off_cuda_falls_back_to_the_reference():
    from fluxrt.accel.norm_rope import KERNELS

    B, H, L, D = 2, 2, 7, 8
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    qs, ks, pe = torch.rand(D), torch.rand(D), _table(B, L, D)
    ref = A.qk_norm_rope(q, k, qs, ks, pe)
    for name in KERNELS:
        with A.norm_rope_kernel(name):
            got = A.qk_norm_rope(q, k, qs, ks, pe)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), name
    assert A.norm_rope_kernel_name() == "reference"


_CHILD = textwrap.dedent("""
    import json, os, sys
    import torch
    from fluxrt.accel.norm_rope_kernels import norm_rope_rows
    from fluxrt.models import attention as A
    from fluxrt.models.transformer import split_heads
    out = {}
    torch.manual_seed(0)
    for B, H, L, D, bcast in ((2, 3, 37, 16, False), (1, 2, 16, 32, True), (3, 1, 5, 8, False)):
        qkv = torch.randn(B, L, 3 * H * D) * 3  # q, k, v as the projection leaves them: strided views
        q, k, v = split_heads(qkv, H)
        ids = torch.randint(0, 50, (1 if bcast else B, L, 4))
        pe = A.rope(ids, (D // 4,) * 4, 2000)
        scale = torch.rand(D) + 0.5
        ref = A.apply_rope(A.rms_norm(k, scale), pe)
        for blhd in (False, True):
            got = norm_rope_rows(k, scale, pe, blhd)
            order = sorted(range(4), key=lambda i: -got.stride(i))
            out[f"{B},{H},{L},{D},{bcast},{blhd}"] = {
                "max_rel": ((got - ref).abs().max() / ref.abs().max()).item(),
                "shape": list(got.shape), "order": order}
    from fluxrt.accel.norm_rope_kernels import norm_rope_send
    from fluxrt.parallel.sp import pack_send
    for B, H, L, D, n in ((2, 4, 9, 16, 2), (1, 6, 20, 8, 3)):
        q, k, v = split_heads(torch.randn(B, L, 3 * H * D) * 3, H)
        pe = A.rope(torch.randint(0, 50, (B, L, 4)), (D // 4,) * 4, 2000)
        qs, ks = torch.rand(D) + 0.5, torch.rand(D) + 0.5
        want = pack_send(torch.stack([*A.qk_norm_rope(q, k, qs, ks, pe), v]), n)
        got = norm_rope_send(q, k, v, qs, ks, pe, n)
        from fluxrt.accel import norm_rope  # the registered triton_ops, run eagerly: the same kernel
        via_op = norm_rope.send_buffer(q, k, v, qs, ks, pe, n)
        rows_op = norm_rope.kernels().rows_op(q, qs, norm_rope.check_inputs(q, qs, pe), True)
        # chunk `own` written where an exchange lands it: a strided (3, B, H/n, L, D) view of a bigger buffer
        own = n - 1
        landed = torch.full((3, B, H // n, n, L, D), float("nan"))
        redirected = norm_rope_send(q, k, v, qs, ks, pe, n, own, landed[:, :, :, own])
        others = [r for r in range(n) if r != own]
        out[f"send {B},{H},{L},{D},{n}"] = {"shape_ok": got.shape == want.shape,
                                            "max_rel": ((got - want).abs().max() / want.abs().max()).item(),
                                            "v_equal": torch.equal(got[:, 2], want[:, 2]),
                                            "ops_equal": torch.equal(via_op, got) and torch.equal(rows_op,
                                                norm_rope_rows(q, qs, pe, True)),
                                            "own_equal": torch.equal(landed[:, :, :, own], got[own]),
                                            "others_equal": torch.equal(redirected[others], got[others]),
                                            "rest_untouched": bool(landed[:, :, :, others].isnan().all())}
    # two runs of tokens (a double block's text, then image) written at their offsets of one send buffer and of
    # the own chunk's landing place: the packed reference of the joined runs
    B, H, D, n, runs = 1, 4, 16, 2, (5, 11)
    parts = [(*split_heads(torch.randn(B, L, 3 * H * D) * 3, H), A.rope(torch.randint(0, 50, (B, L, 4)),
              (D // 4,) * 4, 2000), torch.rand(D) + 0.5, torch.rand(D) + 0.5) for L in runs]
    normed = [(*A.qk_norm_rope(q, k, qs, ks, pe), v) for q, k, v, pe, qs, ks in parts]
    want = pack_send(torch.stack([torch.cat(t, dim=2) for t in zip(*normed)]), n)
    send = torch.full((n, 3, B, H // n, sum(runs), D), float("nan"))
    landed = torch.full((3, B, H // n, n, sum(runs), D), float("nan"))
    start = 0
    for (q, k, v, pe, qs, ks), L in zip(parts, runs):
        norm_rope_send(q, k, v, qs, ks, pe, n, 0, landed[:, :, :, 0, start:start + L], send[..., start:start + L, :])
        start += L
    out["runs"] = {"own_max_rel": ((landed[:, :, :, 0] - want[0]).abs().max() / want.abs().max()).item(),
                   "send_max_rel": ((send[1:] - want[1:]).abs().max() / want.abs().max()).item()}
    for bad in ("scale", "table", "dim"):
        try:
            q = torch.randn(1, 2, 4, 8)
            s, t = torch.rand(8), A.rope(torch.zeros(1, 4, 4), (2, 2, 2, 2), 2000)
            if bad == "scale": s = torch.rand(6)
            if bad == "table": t = A.rope(torch.zeros(1, 5, 4), (2, 2, 2, 2), 2000)
            if bad == "dim": q = torch.randn(1, 2, 4, 12); s = torch.rand(12); t = A.rope(torch.zeros(1, 4, 4), (3, 3, 3, 3), 2000)
            norm_rope_rows(q, s, t)
            out[bad] = "no error"
        except ValueError as e:
            out[bad] = str(e)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_triton_kernel_in_the_interpreter_matches_the_reference_and_writes_the_asked_layout():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.path.abspath(SRC)}
    res = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key, row in out.items():
        if key in ("scale", "table", "dim"):
            continue
        if key == "runs":  # NaN anywhere (a place left unwritten) fails these too
            assert row["own_max_rel"] < 2e-6 and row["send_max_rel"] < 2e-6, row
            continue
        if key.startswith("send"):  # straight into Ulysses' send buffer: the stacked, packed reference
            assert row["shape_ok"] and row["v_equal"] and row["ops_equal"] and row["max_rel"] < 2e-6, (key, row)
            # the own chunk redirected: the same values where the exchange lands them, nothing else written there
            assert row["own_equal"] and row["others_equal"] and row["rest_untouched"], (key, row)
            continue
        B, H, L, D, _, blhd = key.split(",")
        assert row["shape"] == [int(B), int(H), int(L), int(D)], key
        assert row["max_rel"] < 2e-6, (key, row)  # fp32: only summation order and contraction differ
        # (B, L, H, D) memory order for blhd, else (B, H, L, D); size-1 dims may tie, so compare the big ones
        want = [0, 2, 1, 3] if blhd == "True" else [0, 1, 2, 3]
        got = [i for i in row["order"] if int(key.split(",")[i]) > 1]
        assert got == [i for i in want if int(key.split(",")[i]) > 1], (key, row)
    assert "norm scale of shape (6,)" in out["scale"]
    assert "RoPE table of shape (1, 1, 5, 4, 2)" in out["table"]
    assert "power-of-two head dim, got 12" in out["dim"]


@pytest.mark.gpu
def test_gpu_fused_kernel_within_one_bf16_step_of_the_reference_and_compiles_without_breaks():
    from fluxrt.accel.norm_rope import KERNELS

    dev = torch.device("cuda")
    B, H, L, D = 1, 24, 4608, 128
    qkv = torch.randn(B, L, 3 * H * D, device=dev).bfloat16() * 3
    q, k, _ = split_heads(qkv, H)
    qs, ks = (torch.rand(D, device=dev) + 0.5).bfloat16(), (torch.rand(D, device=dev) + 0.5).bfloat16()
    pe = A.rope(grid_ids(72, 64, 0)[None].to(dev), (32, 32, 32, 32), 2000)  # a 1152 x 1024 image's positions
    ref = A.qk_norm_rope(q, k, qs, ks, pe)
    for name in KERNELS:
        with A.norm_rope_kernel(name):
            got = A.qk_norm_rope(q, k, qs, ks, pe)
            compiled = torch.compile(lambda a, b: A.qk_norm_rope(a, b, qs, ks, pe), fullgraph=True)(q, k)
        for g, c, r in zip(got, compiled, ref):
            # rows are RMS-normalised (values of order 1): a rounding flip before the rotation moves an output by
            # about one bf16 step of its inputs, which for a small rotated output is more than its own step
            for how, out in (("eager", g), ("compiled", c)):  # inductor builds the kernel with its own options
                err, same = (out.float() - r.float()).abs().max().item(), (out == r).float().mean().item()
                assert err <= 2**-5 and same > 0.99, (name, how, err, same)  # a wrong pair, table, scale: ~1


def test_use_fused_kernels_sets_and_clears_every_blocks_choice_and_compile_leaves_cpu_models_alone():
    from fluxrt.accel.compile import compile_transformer, decompile, use_fused_kernels
    from fluxrt.config import get_preset
    from fluxrt.models.transformer import Flux2, QKNorm

    model = Flux2(get_preset("tiny").transformer)
    norms = [m for m in model.modules() if isinstance(m, QKNorm)]
    c = get_preset("tiny").transformer
    assert len(norms) == 2 * c.depth + c.depth_single_blocks
    assert use_fused_kernels(model, "triton") == len(norms)
    assert {m.kernel for m in norms} == {"triton"}
    assert "kernel" not in model.state_dict() and not any("kernel" in k for k in model.state_dict())
    use_fused_kernels(model, None)
    assert {m.kernel for m in norms} == {None}
    with pytest.raises(ValueError, match="'fast'"):
        use_fused_kernels(model, "fast")
    compile_transformer(model)  # on the CPU: the model's own ops, compiled
    assert {m.kernel for m in norms} == {None}
    use_fused_kernels(model, "triton-blhd")
    decompile(model)
    assert {m.kernel for m in norms} == {None}


@pytest.mark.gpu
def test_gpu_send_buffer_kernel_matches_the_packed_reference_eagerly_and_compiled():
    from fluxrt.accel import norm_rope
    from fluxrt.parallel.sp import pack_send

    dev = torch.device("cuda")
    B, H, L, D, n = 1, 24, 1152, 128, 4
    q, k, v = split_heads(torch.randn(B, L, 3 * H * D, device=dev).bfloat16() * 3, H)
    qs, ks = (torch.rand(D, device=dev) + 0.5).bfloat16(), (torch.rand(D, device=dev) + 0.5).bfloat16()
    pe = A.rope(grid_ids(36, 32, 0)[None].to(dev), (32, 32, 32, 32), 2000)
    want = pack_send(torch.stack([*A.qk_norm_rope(q, k, qs, ks, pe), v]), n)
    eager = norm_rope.send_buffer(q, k, v, qs, ks, pe, n)
    compiled = torch.compile(lambda a, b, c: norm_rope.send_buffer(a, b, c, qs, ks, pe, n), fullgraph=True)
    for how, got in (("eager", eager), ("compiled", compiled(q, k, v))):
        assert got.shape == want.shape and torch.equal(got[:, 2], want[:, 2]), how  # v: copied as it is
        err, same = (got.float() - want.float()).abs().max().item(), (got == want).float().mean().item()
        assert err <= 2**-5 and same > 0.99, (how, err, same)
    # chunk 1 written where a copy-engine exchange lands it (what `sp.send_qkv` does): the same bits as in eager's
    landed = torch.zeros(3, B, H // n, n, L, D, device=dev, dtype=torch.bfloat16)
    sent = norm_rope.kernels().norm_rope_send(q, k, v, qs, ks, pe, n, 1, landed[:, :, :, 1])
    assert torch.equal(landed[:, :, :, 1], eager[1]) and torch.equal(sent[[0, 2, 3]], eager[[0, 2, 3]])
    assert not landed[:, :, :, [0, 2, 3]].any()


def test_kernels_are_used_only_where_they_can_run():
    from fluxrt.accel import norm_rope

    q = torch.randn(1, 2, 4, 8)
    assert not norm_rope.usable(q)  # a CPU tensor
    if torch.cuda.is_available():
        g = torch.randn(1, 2, 4, 8, device="cuda")
        assert norm_rope.usable(g) == norm_rope.AVAILABLE
        assert not norm_rope.usable(g.requires_grad_())  # no backward: autograd needs the reference ops
        with torch.no_grad():
            assert norm_rope.usable(g) == norm_rope.AVAILABLE

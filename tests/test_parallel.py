"""Parallel plans compute the single-process function: Ulysses, ring, tensor parallel, SP x TP (CPU, gloo).

Each multi-rank test forks 2 or 4 processes (`spawn(..., start_method="fork")`: milliseconds, no re-import) that
build the same tiny fp32 model, compute the single-process output themselves, then the parallel one; the test gets
the largest |difference| over all ranks. Token counts (7 text, 30 image, 12 reference) are not multiples of 2 or
4, so the padding path always runs.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_cpu, tiny_flow

from fluxrt.config import TINY
from fluxrt.models.attention import attention
from fluxrt.models.transformer import Flux2
from fluxrt.parallel import SequenceParallel, apply_tensor_parallel, make_mesh, nccl_env, parallelize, spawn
from fluxrt.parallel.generate import BroadcastTextEncoder
from fluxrt.parallel.sp import Layout, block_attention, merge_blocks, shard_tokens
from fluxrt.parallel.tp import shard_cols, shard_rows
from fluxrt.sampling.latents import grid_ids, pack, text_ids
from fluxrt.sampling.run import sample


def _has_cpu_compiler() -> bool:
    from fluxrt.accel import CompilerMissing, check_cpu_compiler

    try:
        check_cpu_compiler()
    except CompilerMissing:
        return False
    return True

TOL = 1e-5
H, W, N_TXT = 5, 6, 7  # 30 image tokens, 7 text tokens


def _inputs(refs: bool):
    """Full inputs of one forward: image (+ a 3x4 reference at t = 10), text, t = 0.7, guidance 4."""
    g = torch.Generator().manual_seed(3)
    x, x_ids = torch.randn(1, H * W, 128, generator=g), grid_ids(H, W)[None]
    if refs:
        x = torch.cat([x, torch.randn(1, 12, 128, generator=g)], dim=1)
        x_ids = torch.cat([x_ids, grid_ids(3, 4, t=10)[None]], dim=1)
    ctx = torch.randn(1, N_TXT, TINY.transformer.context_in_dim, generator=g)
    return x, x_ids, torch.full((1,), 0.7), ctx, text_ids(N_TXT)[None], torch.full((1,), 4.0)


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _plan(model, sp: int, tp: int, attn: str):
    """One-dimensional plans over the default (world) group; a 2-D mesh of subgroups for SP x TP."""
    if tp == 1:
        return SequenceParallel(model, attention=attn)
    if sp == 1:
        return apply_tensor_parallel(model)
    return parallelize(model, make_mesh(sp, tp), attn)


def _forward_worker(sp: int, tp: int, attn: str, refs: bool) -> float:
    torch.set_num_threads(1)  # forked children: no OpenMP pool after fork
    model, inputs = tiny_flow(guidance_embed=True), _inputs(refs)
    with torch.no_grad():
        ref = model(*inputs[:5], guidance=inputs[5])
        out = _plan(model, sp, tp, attn)(*inputs[:5], guidance=inputs[5])
    assert out.shape == ref.shape
    return _max_over_ranks((out - ref).abs().max().item())


def _sample_worker(sp: int, tp: int, attn: str) -> float:
    torch.set_num_threads(1)
    model, (_, _, _, ctx, _, _) = tiny_flow(guidance_embed=True), _inputs(False)
    noise = torch.randn(1, 128, H, W, generator=torch.Generator().manual_seed(5))
    ref_img = torch.randn(1, 128, 3, 4, generator=torch.Generator().manual_seed(6))
    refs = dict(ref=pack(ref_img), ref_ids=grid_ids(3, 4, t=10)[None])
    full = sample(model, noise, ctx, num_steps=2, guidance=4.0, **refs)
    out = sample(parallelize(model, make_mesh(sp, tp), attn), noise, ctx, num_steps=2, guidance=4.0, **refs)
    return _max_over_ranks((out - full).abs().max().item())


def _compiled_worker() -> float:
    """The blocks of the Ulysses-parallel model compiled as `fluxrt generate --gpus N --compile` does (graph breaks
    allowed at the collectives); the "eager" backend runs dynamo's capture and guards only, to keep this cheap."""
    from fluxrt.accel import compile_transformer

    torch.set_num_threads(1)
    model, inputs = tiny_flow(guidance_embed=True), _inputs(True)
    with torch.no_grad():
        ref = model(*inputs[:5], guidance=inputs[5])
        par = parallelize(model, make_mesh(2, 1), "ulysses")
        compile_transformer(par.model, fullgraph=False, backend="eager")
        out = par(*inputs[:5], guidance=inputs[5])
    return _max_over_ranks((out - ref).abs().max().item())


def _errors_worker() -> list[str]:
    """A 3-head model on 2 ranks: Ulysses and TP refuse with both numbers; ring runs exactly."""
    torch.set_num_threads(1)
    cfg = dataclasses.replace(TINY.transformer, hidden_size=48, num_heads=3)
    msgs = []
    for attn, tp in (("ulysses", 1), ("ring", 2)):
        with pytest.raises(ValueError) as err:
            parallelize(Flux2(cfg), make_mesh(2 // tp, tp), attn)
        msgs.append(str(err.value))
    torch.manual_seed(0)
    model, inputs = Flux2(cfg).eval(), _inputs(False)
    with torch.no_grad():
        ref = model(*inputs[:5], guidance=inputs[5])
        out = parallelize(model, make_mesh(2, 1), "ring")(*inputs[:5], guidance=inputs[5])
    return msgs + [_max_over_ranks((out - ref).abs().max().item())]


def _run(n: int, fn, *args):
    return spawn_cpu(n, fn, *args)


@pytest.mark.parametrize("refs", [False, True], ids=["t2i", "refs"])
@pytest.mark.parametrize("sp,tp,attn", [(2, 1, "ulysses"), (2, 1, "ring"), (1, 2, "ulysses")])
def test_two_ranks_equal_single_process(sp, tp, attn, refs):
    assert _run(2, _forward_worker, sp, tp, attn, refs) < TOL


@pytest.mark.parametrize("refs", [False, True], ids=["t2i", "refs"])
@pytest.mark.parametrize(
    "sp,tp,attn", [(4, 1, "ulysses"), (4, 1, "ring"), (1, 4, "ulysses"), (2, 2, "ulysses"), (2, 2, "ring")]
)
def test_four_ranks_equal_single_process(sp, tp, attn, refs):
    assert _run(4, _forward_worker, sp, tp, attn, refs) < TOL


@pytest.mark.parametrize("n,sp,tp,attn", [(2, 2, 1, "ulysses"), (2, 2, 1, "ring"), (4, 2, 2, "ulysses")])
def test_sampling_equals_single_process(n, sp, tp, attn):
    assert _run(n, _sample_worker, sp, tp, attn) < TOL


def test_compiled_sequence_parallel_equals_single_process():
    assert _run(2, _compiled_worker) < TOL


def _overlap_worker(sp: int, tp: int, refs: bool) -> tuple[float, int]:
    """Ulysses with overlapped single blocks (`overlap=True`) against one process; also how many blocks swapped."""
    torch.set_num_threads(1)
    model, inputs = tiny_flow(guidance_embed=True), _inputs(refs)
    with torch.no_grad():
        ref = model(*inputs[:5], guidance=inputs[5])
        par = parallelize(model, make_mesh(sp, tp), "ulysses", overlap=True)
        out = par(*inputs[:5], guidance=inputs[5])
    return _max_over_ranks((out - ref).abs().max().item()), par.overlapped


@pytest.mark.parametrize("refs", [False, True], ids=["t2i", "refs"])
@pytest.mark.parametrize("n,sp,tp", [(2, 2, 1), (4, 4, 1), (4, 2, 2)])
def test_overlapped_ulysses_equals_single_process(n, sp, tp, refs):
    diff, swapped = _run(n, _overlap_worker, sp, tp, refs)
    assert diff < TOL
    # plain weights get the overlapped forward; tensor-parallel ones keep the block's own (with its all-reduce)
    assert swapped == (TINY.transformer.depth_single_blocks if tp == 1 else 0)


def _collective_order_worker(overlap: bool) -> list[str]:
    """The single block's compiled graph (dynamo capture) as a sequence of all-to-all / wait / matmul events."""
    torch.set_num_threads(1)
    model, inputs = tiny_flow(guidance_embed=True), _inputs(False)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    par = parallelize(model, make_mesh(2, 1), "ulysses", overlap=overlap)
    model.single_blocks[0].compile(backend=capture, fullgraph=True)
    with torch.no_grad():
        par(*inputs[:5], guidance=inputs[5])
    events = []
    for node in graphs[0].graph.nodes:
        name = str(node.target)
        for key, tag in (("all_to_all", "a2a"), ("wait_tensor", "wait"), ("linear", "mm")):
            if key in name:
                events.append(tag)
    return events


def _between(events: list[str]) -> list[int]:
    """Matmuls issued between each all-to-all and the next wait (the work that can hide the transfer)."""
    out, count = [], None
    for e in events:
        if e == "a2a":
            count = 0
        elif e == "mm" and count is not None:
            count += 1
        elif e == "wait" and count is not None:
            out, count = out + [count], None
    return out


def test_overlapped_block_issues_matmuls_while_all_to_alls_are_in_flight():
    plain = _run(2, _collective_order_worker, False)
    overlapped = _run(2, _collective_order_worker, True)
    assert plain.count("a2a") == overlapped.count("a2a") == 2
    assert _between(plain) == [0, 0]  # the block's own order: each transfer waited on at once
    assert _between(overlapped) == [1, 1]  # the MLP's up product, then its down product, run during the transfers


def _inductor_order_worker() -> str:
    """The overlapped block compiled by inductor as `compile_transformer` does: its generated code as a string of
    A (all-to-all started), W (waited on), m (matmul)."""
    from torch._inductor.utils import run_and_get_code

    from fluxrt.accel import compile_transformer

    torch.set_num_threads(1)
    model, inputs = tiny_flow(guidance_embed=True), _inputs(False)
    model.single_blocks = model.single_blocks[:1]
    par = parallelize(model, make_mesh(2, 1), "ulysses", overlap=True)
    compile_transformer(model.single_blocks[0], scope="model")
    with torch.no_grad():
        code = run_and_get_code(lambda: par(*inputs[:5], guidance=inputs[5]))[1][-1]
    tags = {"all_to_all_single.default(": "A", "wait_tensor.default(": "W", "extern_kernels.mm(": "m"}
    return "".join(t for line in code.split("def call")[-1].splitlines() for k, t in tags.items() if k in line)


@pytest.mark.skipif(not _has_cpu_compiler(), reason="inductor on the CPU needs a C++ compiler")
def test_compiled_overlapped_block_keeps_its_matmuls_behind_the_transfers():
    order = _run(2, _inductor_order_worker)
    assert order.count("A") == order.count("W") == 2, order
    windows = [w.split("W")[0] for w in order.split("A")[1:]]  # what runs between each start and its wait
    assert ["m" in w for w in windows] == [True, True], order  # MLP up product during q, k, v; down during output


def _sharded_load_worker(path: str, tp: int) -> tuple[float, float, float, list[str]]:
    """Each rank loads only its shards from the file (`sharded_loading`); compared with the whole model loaded and
    then split, and with one process's forward."""
    from fluxrt.loading.checkpoint import load_transformer
    from fluxrt.parallel.tp import sharded_loading

    torch.set_num_threads(1)
    full, _ = load_transformer(path, "cpu", torch.float32, TINY.transformer)
    inputs = _inputs(True)
    with torch.no_grad():
        ref = full(*inputs[:5], guidance=inputs[5])
    mesh = make_mesh(dist.get_world_size() // tp, tp)
    split_after, _ = load_transformer(path, "cpu", torch.float32, TINY.transformer)
    split_after = apply_tensor_parallel(split_after, mesh.tp_group)
    model, _ = load_transformer(path, "cpu", torch.float32, TINY.transformer, sharded_loading(mesh.tp_group))
    a, b = model.state_dict(), split_after.state_dict()
    differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
    qkv = model.double_blocks[0].img_attn.qkv.weight.shape[0] / full.double_blocks[0].img_attn.qkv.weight.shape[0]
    with torch.no_grad():
        out = parallelize(model, mesh, "ulysses")(*inputs[:5], guidance=inputs[5])
    return _max_over_ranks((out - ref).abs().max().item()), _max_over_ranks(qkv), _max_over_ranks(len(differ)), differ


def _sharded_fp8_worker(path: str) -> tuple[float, float]:
    """`--quant fp8 --parallel tp`: shards loaded then quantized (row shards with whole-row scales) against the whole
    model quantized then split. Returns the number of differing tensors and the max |output difference|."""
    from fluxrt.loading.checkpoint import load_transformer
    from fluxrt.parallel.tp import Fp8RowParallelLinear, quantize_row_shards, sharded_loading
    from fluxrt.quant import quantize
    from fluxrt.quant.fp8 import FP8_SKIP, Fp8Linear

    torch.set_num_threads(1)
    whole, _ = load_transformer(path, "cpu", torch.float32, TINY.transformer)
    whole = apply_tensor_parallel(quantize(whole, "fp8"))
    model, _ = load_transformer(path, "cpu", torch.float32, TINY.transformer, sharded_loading())
    model = quantize_row_shards(quantize(model, "fp8"), FP8_SKIP)
    assert isinstance(model.double_blocks[0].img_attn.proj, Fp8RowParallelLinear)
    assert isinstance(model.single_blocks[0].linear1, Fp8Linear)
    a, b = model.state_dict(), whole.state_dict()
    bits = {k: (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t) for k, t in a.items()}
    differ = [k for k in b if k not in a or not torch.equal(bits[k], b[k].view(torch.uint8) if b[k].dtype ==
                                                            torch.float8_e4m3fn else b[k])]  # fmt: skip
    inputs = _inputs(True)
    for m in (model, whole):
        for lin in m.modules():
            if isinstance(lin, Fp8Linear):
                lin.impl = "reference"
    with torch.no_grad():
        diff = (model(*inputs[:5], guidance=inputs[5]) - whole(*inputs[:5], guidance=inputs[5])).abs().max().item()
    return _max_over_ranks(len(differ) + len(set(a) - set(b))), _max_over_ranks(diff)


@pytest.mark.parametrize("n", [2, 4])
def test_tensor_parallel_fp8_from_shards_equals_quantize_then_split(tmp_path, n):
    from fluxrt.loading.checkpoint import save_bfl

    path = save_bfl(tiny_flow(guidance_embed=True), tmp_path / "flow.safetensors")
    assert _run(n, _sharded_fp8_worker, str(path)) == (0, 0.0)


@pytest.mark.parametrize("n,tp,layout", [(2, 2, "bfl"), (4, 2, "diffusers"), (4, 4, "bfl")])
def test_tensor_parallel_ranks_load_only_their_shards(tmp_path, n, tp, layout):
    from fluxrt.loading.checkpoint import save_bfl, save_diffusers

    model = tiny_flow(guidance_embed=True)
    path = save_bfl(model, tmp_path / "flow.safetensors") if layout == "bfl" else save_diffusers(model, tmp_path / "d")
    err, qkv_share, n_differ, differ = _run(n, _sharded_load_worker, str(path), tp)
    assert n_differ == 0 and differ == []  # every rank's tensors equal those of the whole model split after loading
    assert qkv_share == 1 / tp and err < TOL


def _batch_worker(images: int, mode: str) -> tuple[float, float]:
    """`BatchParallel` sampling `images` images (a CFG model: 2 x images rows per forward) against one process:
    max |difference| relative to max |output| (a rank's rows run at a smaller batch, so BLAS may block them
    differently: fp32 rounding, not a different function)."""
    from fluxrt.parallel.batch import BatchParallel

    torch.set_num_threads(1)
    model = tiny_flow(guidance_embed=mode == "embedded")
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(images, 128, H, W, generator=g)
    ctx = torch.randn(images, N_TXT, TINY.transformer.context_in_dim, generator=g)
    neg = torch.randn(images, N_TXT, TINY.transformer.context_in_dim, generator=g) if mode == "cfg" else None
    refs = dict(ref=pack(torch.randn(1, 128, 3, 4, generator=g)), ref_ids=grid_ids(3, 4, t=10)[None])
    kw = dict(num_steps=2, guidance=4.0, mode=mode, neg_ctx=neg, **refs)
    full = sample(model, noise, ctx, **kw)
    rows = []
    model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    out = sample(BatchParallel(model), noise, ctx, **kw)
    return _max_over_ranks(((out - full).abs().max() / full.abs().max()).item()), _max_over_ranks(max(rows))


@pytest.mark.parametrize("n,images,mode,rows", [(2, 1, "cfg", 1), (2, 2, "embedded", 1), (4, 2, "cfg", 1),
                                                (2, 3, "embedded", 3)],
                         ids=["cfg-halves", "two-images", "4-ranks-cfg", "odd-batch-runs-whole"])  # fmt: skip
def test_batch_parallel_sampling_equals_single_process(n, images, mode, rows):
    err, rows_per_rank = _run(n, _batch_worker, images, mode)
    assert err < TOL and rows_per_rank == rows  # each rank ran only its rows (all of them when n does not divide)


def test_batch_plan_parsing_and_request_checks():
    from fluxrt.config import get_preset
    from fluxrt.parallel.generate import check_batch
    from fluxrt.parallel.plan import Plan, choose_plan, parse_plan

    assert parse_plan("batch", 4) == Plan(1, 1, "ulysses", 4) and parse_plan("batch2").name == "batch2"
    assert choose_plan(TINY.transformer, 2, "batch").world == 2
    with pytest.raises(ValueError, match="batch4 needs 4 ranks, the run has 2"):
        choose_plan(TINY.transformer, 2, "batch4")
    base, dev = get_preset("flux.2-klein-base-4b"), get_preset("flux.2-dev")
    check_batch(Plan(1, 1, "ulysses", 2), base, 1)  # one image: its two CFG halves, one per rank
    check_batch(Plan(1, 1, "ulysses", 4), dev, 12)  # forwards of 8 and 4 images
    with pytest.raises(ValueError, match=r"--num-images 1 runs a forward of 1 row\(s\), one per image: use a "
                                         r"multiple of 2 images"):  # fmt: skip
        check_batch(Plan(1, 1, "ulysses", 2), dev, 1)
    with pytest.raises(ValueError, match=r"1 image\(s\) x 2 CFG halves = 2 rows: use a multiple of 2 images"):
        check_batch(Plan(1, 1, "ulysses", 4), base, 1)
    with pytest.raises(ValueError, match="2 row"):
        check_batch(Plan(1, 1, "ulysses", 4), dev, 10)  # forwards of 8 and 2 images
    with pytest.raises(ValueError, match="KV-cache"):
        check_batch(Plan(1, 1, "ulysses", 2), get_preset("flux.2-klein-9b-kv"), 2)


def test_heads_not_divisible_by_world_size():
    ulysses, tp, ring_diff = _run(2, _errors_worker)
    assert "heads per rank 3" in ulysses and "world size 2" in ulysses
    assert "num_heads 3" in tp and "world size 2" in tp
    assert ring_diff < TOL


class _FakeEncoder(torch.nn.Module):
    config, system_message = "fake", None

    def encode(self, prompts):
        return torch.stack([torch.full((3, 5), float(len(p))) for p in prompts]).to(torch.bfloat16)


def _broadcast_worker() -> list:
    """Rank 0 has an encoder, rank 1 none: both get rank 0's features (dtype and shape travel too)."""
    torch.set_num_threads(1)
    te = BroadcastTextEncoder(_FakeEncoder() if dist.get_rank() == 0 else None, torch.device("cpu"))
    feats = te.encode(["ab", "abcd"])
    ok = feats.dtype == torch.bfloat16 and feats.shape == (2, 3, 5) and feats[1].eq(4).all().item()
    return [int(_max_over_ranks(0.0 if ok else 1.0)), te.config if dist.get_rank() == 0 else None]


def _failing_worker(bad_rank: int) -> None:
    if dist.get_rank() == bad_rank:
        raise KeyError("boom")
    dist.barrier()  # the healthy rank waits in a collective, as it would mid-step


def _env_worker() -> dict:
    return nccl_env()


def test_text_features_broadcast_from_rank_zero():
    assert _run(2, _broadcast_worker) == [0, "fake"]


def test_error_on_any_rank_is_raised_with_its_rank():
    with pytest.raises(KeyError, match="rank 1 of 2: 'boom'") as err:
        _run(2, _failing_worker, 1)
    assert any("_failing_worker" in note for note in err.value.__notes__)  # the child's traceback comes along


def _sleeping_worker() -> None:
    time.sleep(60)


def test_ranks_past_the_deadline_are_stopped():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="_sleeping_worker still running after deadline_s=1.5 s"):
        spawn(2, _sleeping_worker, start_method="fork", deadline_s=1.5)
    assert time.monotonic() - start < 30
    with pytest.raises(ValueError, match="deadline_s must be positive seconds, got 0"):
        spawn(2, _sleeping_worker, start_method="fork", deadline_s=0)


def _thread_pool_worker() -> int:
    from torch._inductor.async_compile import AsyncCompile

    return AsyncCompile.pool().submit(lambda: 7).result(timeout=30)


def test_forked_ranks_get_their_own_compile_thread_pool(monkeypatch):
    """inductor's compile thread pool, used in the parent before a fork: a child that compiles must not wait on the
    parent's threads (they do not exist after the fork; this hung CI for 80 minutes)."""
    import torch._inductor.async_compile as ac

    monkeypatch.setattr(ac, "get_compile_threads", lambda: 2)
    ac.AsyncCompile.pool.cache_clear()
    try:
        assert ac.AsyncCompile.pool().submit(lambda: 3).result(timeout=30) == 3  # the parent's threads start
        assert _run(2, _thread_pool_worker) == 7
    finally:
        ac.AsyncCompile.pool().shutdown(wait=True)
        ac.AsyncCompile.pool.cache_clear()


def test_nccl_environment_reaches_ranks_unchanged(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    assert _run(2, _env_worker) == {"NCCL_DEBUG": "WARN", "NCCL_NVLS_ENABLE": "0"} == nccl_env()


def _fp8_worker(skip: tuple[str, ...]) -> tuple[float, float, float]:
    """fp8 layers quantized in one process, then sharded (`fluxrt generate --quant fp8 --parallel tp`'s order).
    Returns, as max over ranks: |TP - one process fp8| / |one process fp8|, and the relative L2 errors of the
    one-process and TP fp8 outputs against the unquantized model."""
    import copy

    from fluxrt.quant.fp8 import quantize_transformer

    torch.set_num_threads(1)
    model, inputs = tiny_flow(guidance_embed=True), _inputs(True)
    with torch.no_grad():
        exact = model(*inputs[:5], guidance=inputs[5])
        fp8 = quantize_transformer(copy.deepcopy(model), skip, impl="reference")
        one = fp8(*inputs[:5], guidance=inputs[5])
        out = apply_tensor_parallel(fp8)(*inputs[:5], guidance=inputs[5])
    return tuple(
        _max_over_ranks(((a - b).norm() / b.norm()).item()) for a, b in ((out, one), (one, exact), (out, exact))
    )


def test_tensor_parallel_fp8_column_shards_equal_single_process():
    """Only the column-sharded layers (qkv, linear1) in fp8: weights and row scales slice together, exactly."""
    from fluxrt.quant.fp8 import FP8_SKIP

    diff, err_one, _ = _run(2, _fp8_worker, (*FP8_SKIP, "*proj"))
    assert err_one > 1e-3  # fp8 did happen
    assert diff < TOL


@pytest.mark.parametrize("n", [2, 4])
def test_tensor_parallel_fp8_default_layers(n):
    """The default fp8 layers, proj row-sharded: activations scaled per rank's features, so TP and one process
    round differently (measured: 0.022-0.024 apart, each ~0.038 from the unquantized model) but TP is no less
    accurate; a mis-sliced weight or scale would put it O(1) away."""
    from fluxrt.quant.fp8 import FP8_SKIP

    diff, err_one, err_tp = _run(n, _fp8_worker, FP8_SKIP)
    assert 1e-3 < err_one < 0.1
    assert diff < err_one
    assert err_tp < 1.1 * err_one


def test_tensor_parallel_refuses_4bit_layers():
    from fluxrt.quant.formats import quantize

    model = quantize(tiny_flow(guidance_embed=True), "nf4")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="Nf4Linear"):
            apply_tensor_parallel(model)
    finally:
        dist.destroy_process_group()


# ---- single-process pieces -------------------------------------------------------------------------------


def test_layout_marks_padding():
    lay = Layout(n_txt=7, n_img=30, world=4)  # pt 2 (pad 1), pi 8 (pad 2)
    assert (lay.pt, lay.pi, lay.padded) == (2, 8, True)
    assert [lay.valid(r) for r in range(4)] == [(2, 8), (2, 8), (2, 8), (1, 6)]
    idx = lay.key_index("cpu")
    assert len(idx) == 37 and 3 * 10 + 1 not in idx.tolist() and 3 * 10 + 2 + 6 not in idx.tolist()
    x = torch.arange(7.0)[None, :, None]
    assert torch.equal(torch.cat([shard_tokens(x, r, 4) for r in range(4)], 1)[:, :7], x)


def test_online_softmax_blocks_equal_full_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=g) for _ in range(3))
    out, lse = torch.zeros(2, 3, 9, 16), torch.full((2, 3, 9), -torch.inf)
    for kb, vb in zip(k.split([4, 0, 5], 2), v.split([4, 0, 5], 2)):
        if kb.shape[2]:
            out, lse = merge_blocks(out, lse, *block_attention(q, kb, vb))
    full = attention(q, k, v).unflatten(-1, (3, 16)).transpose(1, 2)
    assert (out - full).abs().max() < 1e-6


def test_shards_keep_fused_layout():
    """Rank r's rows of [q | k | v | gate | up] are its heads of each part; columns of [attn | mlp] likewise."""
    w = torch.arange(10.0)[:, None].expand(10, 3)  # blocks [2, 2, 2, 2, 2]
    assert shard_rows(w, [2] * 5, 1, 2)[:, 0].tolist() == [1, 3, 5, 7, 9]
    assert shard_cols(w.t(), [4, 6], 0, 2)[0].tolist() == [0, 1, 4, 5, 6]


@pytest.mark.gpu
def test_flash_block_attention_matches_fp32_math():
    q, k, v = (torch.randn(1, 4, 300, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = block_attention(q, k, v)
    ref_out, ref_lse = block_attention(q.float(), k.float(), v.float())
    assert (out - ref_out).abs().max() < 2e-2 and (lse - ref_lse).abs().max() < 1e-2


@pytest.mark.skipif(not _has_cpu_compiler(), reason="inductor on the CPU needs a C++ compiler")
def test_a_compile_mode_keeps_the_overlapped_blocks_options(monkeypatch):
    """torch.compile takes a mode or options, not both: the overlapped blocks get the mode's options and theirs."""
    from fluxrt.accel import compile_transformer
    from fluxrt.models.transformer import DoubleStreamBlock
    from fluxrt.parallel.sp import OverlappedSingleBlock, overlap_single_blocks

    seen = {}
    for cls in (OverlappedSingleBlock, DoubleStreamBlock):
        monkeypatch.setattr(cls, "compile", lambda self, **kw: seen.setdefault(type(self).__name__, kw))
    model = tiny_flow(guidance_embed=True)
    assert overlap_single_blocks(model) == TINY.transformer.depth_single_blocks
    compile_transformer(model, "max-autotune-no-cudagraphs")
    assert seen["DoubleStreamBlock"]["mode"] == "max-autotune-no-cudagraphs"
    single = seen["OverlappedSingleBlock"]
    assert "mode" not in single, single
    assert single["options"] == {"max_autotune": True, "coordinate_descent_tuning": True,
                                 "reorder_for_peak_memory": False, "reorder_for_locality": False}  # fmt: skip

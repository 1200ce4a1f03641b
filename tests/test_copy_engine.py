"""The copy-engine transport's exchange (`fluxrt.parallel.copy_engine`) on the CPU: symmetric memory stood in for
by files every rank process maps shared (`SharedFileBuffer`), barriers over gloo, so the packing, the chunk order,
the two-buffer reuse and the Ulysses wiring run on real shared memory as they do on GPUs (the copy engines, the
streams and the barrier kernels are CUDA-only and timed by bench/parallel.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_all, tiny_flow
from test_parallel import TOL, _inputs, _max_over_ranks, _run

from fluxrt.parallel import SequenceParallel, make_mesh, parallelize
from fluxrt.parallel.copy_engine import CopyEngineExchange, SharedFileBuffer, make_exchange


def _exchange_worker(strided: bool, push: bool = False) -> list[list[float]]:
    """Rank r sends chunk i = [100 r + i, ...] to rank i, three times (the two buffers taken in turn, the first
    reused); returns what arrived."""
    n, r = dist.get_world_size(), dist.get_rank()
    ex = CopyEngineExchange(buffer=SharedFileBuffer, push=push)
    got = []
    for rep in range(3):
        send = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + 100 * r + 1000 * rep
        if strided:  # a transposed view, as Ulysses passes its permuted heads
            send = send.t().contiguous().t()
        out = ex.wait(ex.start(send))
        got.append(out[:, 0].tolist())
    return got


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_exchange_is_an_all_to_all(n, strided, push):
    got = spawn_all(n, _exchange_worker, strided, push)
    for r, runs in enumerate(got):
        for rep, firsts in enumerate(runs):
            # out[src] on rank r is chunk r of rank src: its first element 100 src + 3 r + 1000 rep
            assert firsts == [100 * src + 3 * r + 1000 * rep for src in range(n)]


def _landing_worker(push: bool) -> tuple[list[int], float]:
    """`start(send, dim=2)` three times: chunk (2, 3, 4) from rank src must land at [:, :, src] of a (2, 3, n, 4)
    result; returns its shape and the largest difference from what every rank sent (seeded, so known here)."""
    n, r = dist.get_world_size(), dist.get_rank()
    ex, worst = CopyEngineExchange(buffer=SharedFileBuffer, push=push), 0.0

    def sent(src: int, rep: int) -> torch.Tensor:
        return torch.randn(n, 2, 3, 4, generator=torch.Generator().manual_seed(10 * src + rep))

    for rep in range(3):
        out = ex.wait(ex.start(sent(r, rep), dim=2))
        expected = torch.stack([sent(src, rep)[r] for src in range(n)], dim=2)
        worst = max(worst, (out - expected).abs().max().item())
    return list(out.shape), worst


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_chunks_land_where_start_is_asked_to_put_them(n, push):
    for shape, worst in spawn_all(n, _landing_worker, push):
        assert shape == [2, 3, n, 4] and worst == 0


def _own_written_worker() -> tuple[bool, list[str]]:
    """Push mode with the own chunk written by the caller at `landing()` (dim 2), three times (both buffers, the
    first reused): whether the result equalled every rank's sends each time; then what pull mode says when asked
    the same."""
    n, r = dist.get_world_size(), dist.get_rank()
    ex, equal = CopyEngineExchange(buffer=SharedFileBuffer, push=True), True

    def sent(src: int, rep: int) -> torch.Tensor:
        return torch.randn(n, 2, 3, 4, generator=torch.Generator().manual_seed(10 * src + rep))

    for rep in range(3):
        send = sent(r, rep)
        ex.landing(send.shape, send.dtype, send.device, dim=2).copy_(send[r])
        send[r] = float("nan")  # not read: the exchange copies only the peers' chunks
        out = ex.wait(ex.start(send, dim=2, own_written=True))
        expected = torch.stack([sent(src, rep)[r] for src in range(n)], dim=2)
        equal = equal and torch.equal(out, expected)  # a NaN of the own chunk's send would fail it
    msgs, pull = [], CopyEngineExchange(buffer=SharedFileBuffer, push=False)
    for call in (lambda: pull.landing((n, 2), torch.float32, "cpu"), lambda: pull.start(torch.zeros(n, 2), 0, True)):
        try:
            call()
        except ValueError as e:
            msgs.append(str(e))
    return equal, msgs


@pytest.mark.parametrize("n", [2, 4])
def test_an_own_chunk_written_where_it_lands_is_not_copied_again(n):
    for equal, msgs in spawn_all(n, _own_written_worker):
        assert equal
        assert len(msgs) == 2 and "pull mode" in msgs[0] and "push mode" in msgs[1], msgs


def _ulysses_worker(sp: int, tp: int, overlap: bool, refs: bool, settings: dict) -> float:
    """`settings`: the CopyEngineExchange's (push, land, land_output)."""
    torch.set_num_threads(1)
    model, inputs = tiny_flow(guidance_embed=True), _inputs(refs)
    with torch.no_grad():
        ref = model(*inputs[:5], guidance=inputs[5])
        mesh = make_mesh(sp, tp)
        ex = CopyEngineExchange(mesh.sp_group, buffer=SharedFileBuffer, **settings)
        par = parallelize(model, mesh, "ulysses", overlap=overlap, transport=ex)
        out = par(*inputs[:5], guidance=inputs[5])
        assert par.exchange is not None  # the transport reached the wrapper
    return _max_over_ranks((out - ref).abs().max().item())


@pytest.mark.parametrize("refs", [False, True], ids=["t2i", "refs"])
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
@pytest.mark.parametrize("n,sp,tp", [(2, 2, 1), (4, 4, 1), (4, 2, 2)])
def test_ulysses_over_copy_engine_transport_equals_single_process(n, sp, tp, overlap, refs):
    assert _run(n, _ulysses_worker, sp, tp, overlap, refs, {"push": False}) < TOL


@pytest.mark.parametrize("n,sp,tp", [(2, 2, 1), (4, 4, 1)])
def test_ulysses_over_pushed_copies_equals_single_process(n, sp, tp):
    assert _run(n, _ulysses_worker, sp, tp, True, True, {"push": True}) < TOL


@pytest.mark.parametrize("land,land_output", [(False, False), (True, False), (False, True)],
                         ids=["flat", "output-permuted", "flat-output-landed"])  # fmt: skip
@pytest.mark.parametrize("n,sp,tp", [(2, 2, 1), (4, 2, 2)])
def test_ulysses_with_each_landing_equals_single_process(n, sp, tp, land, land_output):
    """q, k, v landing rank by rank (`land=False`, then permuted) or in head order, the output permuted before its
    exchange (`land_output=False`) or landing in (B, L, H) order (the default, which the other tests run)."""
    settings = {"push": True, "land": land, "land_output": land_output}
    assert _run(n, _ulysses_worker, sp, tp, True, True, settings) < TOL


def _own_landed_worker(own_landed: bool, token_major: bool = True) -> tuple[float, int]:
    """The overlapped blocks over pushed copies with `sp.OWN_LANDED` on or off: the difference from one process and
    how many exchanges had their own chunk written where it lands (`landing` calls)."""
    from fluxrt.parallel import sp as sp_mod

    torch.set_num_threads(1)
    model, inputs = tiny_flow(guidance_embed=True), _inputs(True)
    sp_mod.OWN_LANDED[0], sp_mod.TOKEN_MAJOR[0] = own_landed, token_major
    try:
        with torch.no_grad():
            ref = model(*inputs[:5], guidance=inputs[5])
            ex, calls = CopyEngineExchange(buffer=SharedFileBuffer, push=True), []
            landing = ex.landing
            ex.landing = lambda *a, **k: calls.append(a) or landing(*a, **k)
            par = parallelize(model, make_mesh(2, 1), "ulysses", overlap=True, transport=ex)
            out = par(*inputs[:5], guidance=inputs[5])
    finally:
        sp_mod.OWN_LANDED[0] = sp_mod.TOKEN_MAJOR[0] = True
    return _max_over_ranks((out - ref).abs().max().item()), len(calls)


def test_blocks_write_their_own_heads_where_they_land_and_equal_single_process():
    model = tiny_flow(guidance_embed=True)
    blocks = len(model.single_blocks) + len(model.double_blocks)
    assert len(model.double_blocks) >= 1
    diff, landed = _run(2, _own_landed_worker, True)
    assert diff < TOL and landed == blocks  # one q, k, v exchange per block, a double block's two streams in one
    diff, landed = _run(2, _own_landed_worker, True, False)  # landing head-major (bench :ceheadmajor)
    assert diff < TOL and landed == blocks
    diff, landed = _run(2, _own_landed_worker, False)  # the own chunk packed, then copied (bench :ceowncopy)
    assert diff < TOL and landed == 0


def _errors_worker() -> list[str]:
    model = tiny_flow(guidance_embed=True)
    msgs = []
    for kwargs in ({"attention": "ring", "transport": "copy-engine"}, {"transport": "carrier-pigeon"}):
        try:
            SequenceParallel(model, **kwargs)
        except ValueError as e:
            msgs.append(str(e))
    try:  # the real transport on CPU tensors: refused with the device named, before any buffer exists
        make_exchange("copy-engine", None).start(torch.zeros(dist.get_world_size(), 2))
    except ValueError as e:
        msgs.append(str(e))
    return msgs


def test_bad_transport_choices_are_refused_with_the_value():
    msgs = _run(2, _errors_worker)
    assert len(msgs) == 3, msgs
    assert "'copy-engine'" in msgs[0] and "ring" in msgs[0]
    assert "'carrier-pigeon'" in msgs[1] and "copy-engine" in msgs[1]
    assert "CUDA" in msgs[2] and "cpu" in msgs[2]


def _symmetric_on_cpu_worker() -> str:
    from fluxrt.parallel.copy_engine import SymmetricBuffer

    try:
        SymmetricBuffer(4, torch.float32, torch.device("cpu"), dist.group.WORLD)
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_symmetric_memory_that_cannot_be_set_up_says_which_transport_to_use():
    msg = _run(2, _symmetric_on_cpu_worker)
    assert "could not set up symmetric memory on cpu" in msg and "use --transport nccl" in msg, msg


def _compiled_worker(push: bool) -> float:
    """The overlapped Ulysses model over the copy-engine transport, its blocks compiled as `fluxrt generate --gpus N
    --compile` does (fullgraph=False: the exchange's calls are graph breaks), against one process; two forwards,
    so the second runs the compiled code."""
    from fluxrt.accel import compile_transformer

    torch.set_num_threads(1)
    model, inputs = tiny_flow(guidance_embed=True), _inputs(True)
    with torch.no_grad():
        ref = model(*inputs[:5], guidance=inputs[5])
        ex = CopyEngineExchange(buffer=SharedFileBuffer, push=push)
        par = parallelize(model, make_mesh(2, 1), "ulysses", overlap=True, transport=ex)
        compile_transformer(par.model, fullgraph=False, backend="aot_eager")
        diff = max((par(*inputs[:5], guidance=inputs[5]) - ref).abs().max().item() for _ in range(2))
    return _max_over_ranks(diff)


@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_compiled_blocks_with_the_copy_engine_transport_equal_single_process(push):
    assert _run(2, _compiled_worker, push) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_copy_chunk_is_a_strided_copy_also_inside_a_cuda_graph():
    """`copy_chunk` on CUDA (one cudaMemcpy2DAsync) writes what torch's strided copy writes, eagerly and replayed."""
    from fluxrt.parallel.copy_engine import copy_chunk, landed_shape

    n, dim = 4, 3
    send = torch.randn(n, 3, 1, 6, 40, 128, device="cuda", dtype=torch.bfloat16)
    out, ref = (torch.zeros(landed_shape(send.shape, dim), device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for r in range(n):
        copy_chunk(out.select(dim, r), send[r], dim)
        ref.select(dim, r).copy_(send[r])
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    out.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(n):
            copy_chunk(out.select(dim, r), send[r], dim)
    send.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref * 2)


def test_a_missing_cuda_runtime_is_a_clear_error(monkeypatch):
    """Without a loadable libcudart the 2-D copies cannot be issued: an error naming the library and the way out."""
    import ctypes

    from fluxrt.parallel import copy_engine

    def refuse(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")

    copy_engine._cudart.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", refuse)
    monkeypatch.setattr(copy_engine.torch.version, "cuda", "13.0")
    with pytest.raises(RuntimeError, match=r"libcudart\.so\.13.*--transport nccl"):
        copy_engine._cudart()
    copy_engine._cudart.cache_clear()

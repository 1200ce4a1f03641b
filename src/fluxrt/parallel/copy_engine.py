"""All-to-all on the GPUs' copy engines, through symmetric memory: Ulysses' head exchange without NCCL kernels.

NCCL's all-to-all runs as kernels on the SMs; overlapped with the single blocks' MLP products (`--overlap`) it
slowed them by about what it hid (docs/PARALLEL.md). Here every rank has a buffer that every rank of the group can
read and write (PyTorch's symmetric memory: peer-to-peer mappings over NVLink, no multicast), and each rank writes
its chunk for rank i straight into rank i's buffer with a plain device-to-device copy, which the GPU runs on its
copy engines: no SM is taken from the matmuls running beside them. One barrier (a tiny kernel) per exchange, after
the writes: every chunk has arrived before anyone reads its buffer; two buffers per shape, used in turn, keep a
buffer from being written again before its owner has read it. (Pull mode, `push=False`: each rank packs its own
buffer, the barrier, then each rank copies its chunks from the peers' buffers: 2.7% slower per 1024² image on
4 H200s, bench/RESULTS.md.)

    ex = CopyEngineExchange(group)
    out = ex.start(send)   # send (n, ...): chunk i goes to rank i
    ...                    # work issued here runs while the copies are in flight
    out = ex.wait(out)     # out (n, ...) contiguous: out[r] is what rank r sent to this rank

Both calls are opaque to torch.compile (graph breaks): compile with fullgraph=False, as `fluxrt generate --gpus`
does. The buffers are allocated at the first exchange of each size (a collective: every rank exchanges the same
sizes in the same order, as Ulysses does) and kept. CUDA only; `SharedFileBuffer` (files mapped shared by every rank)
stands in for symmetric memory on the CPU (gloo), so the tests run the same code on real shared memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import math
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

TRANSPORTS = ("nccl", "copy-engine")  # offered on the command line
_SETTINGS = {  # CopyEngineExchange's settings per transport name; the variants, to compare, change one each
    "copy-engine": {},
    "copy-engine-pull": {"push": False},  # bench/parallel.py's :cepull
    "copy-engine-flat": {"land": False},  # :ceflat
    "copy-engine-permute-output": {"land_output": False},  # :ceperm
}
VARIANTS = tuple(name for name in _SETTINGS if name not in TRANSPORTS)


class SymmetricBuffer:
    """A flat buffer of `numel` elements on every rank of `group`, each rank's readable by all (CUDA)."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, group):
        import torch.distributed._symmetric_memory as symm_mem

        self.numel, self.dtype = numel, dtype
        try:
            self.local = symm_mem.empty(numel, dtype=dtype, device=device)
            self.handle = symm_mem.rendezvous(self.local, group.group_name)
        except Exception as e:  # no peer access, an old driver, a sandbox without IPC: say what to do instead
            raise RuntimeError(f"the copy-engine transport could not set up symmetric memory on {device} "
                               f"({type(e).__name__}: {e}); use --transport nccl") from e  # fmt: skip

    def remote(self, src: int) -> torch.Tensor:
        """Rank `src`'s buffer, mapped into this process (reads go over NVLink)."""
        return self.handle.get_buffer(src, (self.numel,), self.dtype)

    def barrier(self) -> None:
        """A kernel on the current stream that returns once every rank's stream has reached its own."""
        self.handle.barrier(channel=0)


class SharedFileBuffer:
    """The CPU stand-in for `SymmetricBuffer` (tests, gloo): every rank's buffer is a file that every rank of the
    group maps shared (`torch.from_file`), so reads and writes of a peer's buffer are real cross-process memory,
    as over NVLink; the barrier is the group's. Made collectively (rank 0 names a fresh folder; the files are
    unlinked once every rank has mapped them)."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, group):
        if torch.device(device).type != "cpu":
            raise ValueError(f"SharedFileBuffer maps CPU memory; got {device}")
        rank, n = dist.get_rank(group), dist.get_world_size(group)
        folder = [tempfile.mkdtemp(prefix="fluxrt-symm-") if rank == 0 else None]
        dist.broadcast_object_list(folder, src=dist.get_global_rank(group, 0), group=group)
        files = [os.path.join(folder[0], f"{r}.bin") for r in range(n)]
        self.group, self.local = group, torch.from_file(files[rank], shared=True, size=numel, dtype=dtype)
        dist.barrier(group=group)  # every file exists at its full size
        self._peers = [torch.from_file(f, shared=True, size=numel, dtype=dtype) for f in files]
        dist.barrier(group=group)
        if rank == 0:
            shutil.rmtree(folder[0])  # the mappings stay valid

    def remote(self, src: int) -> torch.Tensor:
        return self._peers[src]

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def landed_shape(shape, dim: int) -> tuple:
    """Shape of what `CopyEngineExchange.start(send, dim)` returns for a send of `shape` (n, *rest): the source
    rank's index moved to position `dim` of rest (dim 0: the send's own shape)."""
    n, *rest = shape
    return (*rest[:dim], n, *rest[dim:])


class _Slot:
    """The two buffers exchanges of one shape alternate between, with their views made once. Push: this rank's
    buffer as what it returns (chunks landed at `dim`), and per destination rank where this rank's chunk goes in
    that rank's buffer. Pull: this rank's packed send, and per source rank the chunk of its buffer meant for it."""

    def __init__(self, make, shape: torch.Size, rank: int, n: int, push: bool, dim: int):
        self.buffers = [make(), make()]
        if push:
            landed = landed_shape(shape, dim)
            self.local = [b.local.view(landed) for b in self.buffers]
            self.remote = [[b.remote(d).view(landed).select(dim, rank) for d in range(n)] for b in self.buffers]
        else:
            self.local = [b.local.view(shape) for b in self.buffers]
            self.remote = [[b.remote(src).view(shape)[rank] for src in range(n)] for b in self.buffers]
        self.turn = 0
        self.last = None  # (event, recorded in a CUDA graph capture) ending the latest exchange of this shape


class CopyEngineExchange:
    """All-to-all over `group` through symmetric memory (see the module's docstring).

    buffer: the buffer class (default `SymmetricBuffer`, which needs CUDA; `SharedFileBuffer` on the CPU).
    push (default): each rank writes its chunks straight into the peers' buffers (the copies start as soon as
    `send` is ready, with no kernel before them), then the barrier; `start` returns this rank's buffer itself,
    valid until the second exchange of the same shape after it. Exchanges of the same shape alternate between
    two buffers, and a peer writes buffer i again only after a barrier that this rank enters after reading
    buffer i: the exchange in between, since Ulysses reads each result before it starts the next exchange.
    push=False (pull): each rank packs its own buffer, the barrier, then pulls chunk r of every rank r's buffer
    into a new tensor; a rank packs buffer i again only after the exchange in between has passed its barrier,
    which each rank reaches after its pulls from buffer i.
    land: Ulysses asks for its q, k, v to land in head order (`start(send, dim)`), no permute kernel after;
    False: they land rank by rank and a kernel permutes them (to compare: bench variant `:ceflat`).
    land_output (default): the attention's output is sent as it lies (token chunks of the (B, L, h/n*D) output)
    and lands in the (B, Ls, h*D) layout the next linear reads: no permute kernel before or after it (rows of
    h/n*D elements); 0.3-0.4% faster per image than permuting it first (False, bench variant `:ceperm`), on 2 and
    4 H200s (bench/RESULTS.md).
    """

    def __init__(self, group=None, buffer=None, push: bool = True, land: bool = True, land_output: bool = True):
        self.group = group if group is not None else dist.group.WORLD
        self.n, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.buffer, self.push, self.land, self.land_output = buffer, push, land, land_output
        self._slots: dict[tuple, _Slot] = {}
        self._fences: dict[torch.device, object] = {}  # `begin`'s one-element buffers
        self._streams: list | None = None
        self._pending: dict[int, tuple] = {}  # id(out) -> (out, event, send while pushes read it) until `wait`

    def _slot(self, shape, dtype: torch.dtype, device: torch.device, dim: int) -> _Slot:
        key = (tuple(shape), dtype, torch.device(device), dim)
        if key not in self._slots:
            make = functools.partial(self._make, math.prod(shape), dtype, torch.device(device))
            self._slots[key] = _Slot(make, torch.Size(shape), self.rank, self.n, self.push, dim)
        return self._slots[key]

    @torch.compiler.disable
    def landing(self, shape, dtype: torch.dtype, device: torch.device, dim: int = 0) -> torch.Tensor:
        """Push mode: where this rank's own chunk lands in the result of the next `start` of a send of `shape`
        (the `.select(dim, rank)` view of this rank's buffer that `start` returns). Write the own chunk there, then
        call `start(send, dim, own_written=True)`: the exchange skips its copy. Safe to write before `start`:
        peers write only their own chunks into this buffer, and this rank's last read of it is earlier on the
        same stream."""
        if not self.push:
            raise ValueError("landing() is where a pushed exchange's result lies; pull mode packs a new tensor")
        slot = self._slot(shape, dtype, device, dim)
        return slot.local[slot.turn].select(dim, self.rank)

    @torch.compiler.disable
    def begin(self, device: torch.device) -> None:
        """A barrier on the current stream, to call before a forward's exchanges: every rank has finished the
        exchanges before it (each waited for its copies), so no buffer is still being read whichever of its two
        buffers a shape starts with. Needed under CUDA graphs, whose replays repeat one capture's buffer order
        (an odd number of exchanges of a shape per forward would otherwise reuse a buffer back to back)."""
        device = torch.device(device)
        if device not in self._fences:
            self._fences[device] = self._make(1, torch.float32, device)
        self._fences[device].barrier()

    def _make(self, numel: int, dtype: torch.dtype, device: torch.device):
        cls = self.buffer
        if cls is None:
            if device.type != "cuda":
                raise ValueError(f"the copy-engine transport needs CUDA tensors (symmetric memory); got {device}")
            cls = SymmetricBuffer
        return cls(numel, dtype, device, self.group)

    @torch.compiler.disable
    def start(self, send: torch.Tensor, dim: int = 0, own_written: bool = False) -> torch.Tensor:
        """(n, *rest) contiguous send -> receive buffer, filled asynchronously; read it only through `wait`.

        dim: where the chunks land: the result has shape `landed_shape(send.shape, dim)`, and `.select(dim, r)` of
        it is what rank r sent. dim 0: (n, *rest), chunk r at [r]; dim k: the chunks interleaved in the layout the
        caller reads, so that no permute copy follows (Ulysses' q, k, v land as (3, B, h/n, n, Ls, D), tokens in
        rank order: a free reshape to (3, B, h/n, n*Ls, D)); each chunk then arrives as one 2-D copy (rows of
        prod(rest[dim:]) elements), still on the copy engines. own_written (push mode): the caller has already
        written its own chunk at `landing(send.shape, ...)`; `send[rank]` is not read.
        """
        if send.shape[0] != self.n:
            raise ValueError(f"all-to-all over {self.n} ranks needs dim 0 of size {self.n}, got {tuple(send.shape)}")
        if not 0 <= dim < send.dim():
            raise ValueError(f"dim {dim} is outside the {send.dim() - 1} dims a chunk of {tuple(send.shape)} has")
        if own_written and not self.push:
            raise ValueError("own_written needs push mode: pull mode lands every chunk in a new tensor")
        send = send if dim == 0 else send.contiguous()  # chunks as whole rows for the 2-D copies
        slot = self._slot(send.shape, send.dtype, send.device, dim)
        turn, slot.turn = slot.turn, 1 - slot.turn
        local, remote = slot.local[turn], slot.remote[turn]
        cuda = send.device.type == "cuda"
        if cuda and self._streams is None:  # one per peer, so that the copies to or from each peer run at once
            # high priority, meant to get the barrier kernel onto an SM before the matmul launched beside it takes
            # them all (pulls wait for the barrier); it made no measurable difference (bench/RESULTS.md)
            self._streams = [torch.cuda.Stream(device=send.device, priority=-1) for _ in range(self.n)]
        main = torch.cuda.current_stream() if cuda else None
        capturing = cuda and torch.cuda.is_current_stream_capturing()
        if slot.last is not None and slot.last[1] == capturing:  # (an event from before a CUDA graph capture
            main.wait_event(slot.last[0])  # cannot be waited on inside it; what it guards came before the graph)
        streams = self._streams if cuda else [None] * self.n
        if self.push:
            out = self._push(send, slot.buffers[turn], local, remote, streams, main, dim, own_written)
        else:
            out = self._pull(send, slot.buffers[turn], local, remote, streams, main, dim)
        if cuda:  # the exchange before this one passed its barrier: the next one may reuse this buffer
            slot.last = (streams[0].record_event(), capturing)
            self._pending[id(out)] = (out, slot.last[0], send if self.push else None)  # pushes read `send`
        return out

    def _pull(self, send, buf, local, remote, streams, main, dim) -> torch.Tensor:
        """Pack `send` into this rank's buffer, the barrier, then chunk r of every rank r's buffer; a new tensor."""
        local.copy_(send)  # pack (contiguous: a device-to-device copy, on the current stream)
        out = torch.empty(landed_shape(send.shape, dim), dtype=send.dtype, device=send.device)
        copy_chunk(out.select(dim, self.rank), local[self.rank], dim)
        fence = streams[0]
        _follow(fence, main)
        with _on(fence):
            buf.barrier()  # every rank has packed
        for i in range(1, self.n):
            src, stream = (self.rank + i) % self.n, streams[i]
            _follow(stream, fence)
            with _on(stream):
                copy_chunk(out.select(dim, src), remote[src], dim)  # from a peer's memory: a copy engine
            _follow(fence, stream)
        return out

    def _push(self, send, buf, local, remote, streams, main, dim, own_written: bool) -> torch.Tensor:
        """Chunk i of `send` into rank i's buffer (this rank's own unless `own_written`), then the barrier; this
        rank's buffer (`local`)."""
        fence = streams[0]
        if not own_written:
            copy_chunk(local.select(dim, self.rank), send[self.rank], dim)
        for i in range(1, self.n):
            dst, stream = (self.rank + i) % self.n, streams[i]
            _follow(stream, main)
            with _on(stream):
                copy_chunk(remote[dst], send[dst], dim)  # into rank dst's buffer, at this rank's chunk
            _follow(fence, stream)
        _follow(fence, main)
        with _on(fence):
            buf.barrier()  # every rank has written into every buffer
        return local

    @torch.compiler.disable
    def wait(self, out: torch.Tensor) -> torch.Tensor:
        """Make the current stream wait for the exchange that fills `out`; returns `out`."""
        entry = self._pending.pop(id(out), None)
        if entry is not None:
            torch.cuda.current_stream().wait_event(entry[1])
        return out


def copy_chunk(dst: torch.Tensor, src: torch.Tensor, dim: int) -> None:
    """dst = src, src contiguous, dst a `.select(dim, r)` view of a contiguous tensor: rows of prod(shape[dim:])
    contiguous elements, one every `dst.stride(dim - 1)`. On CUDA one cudaMemcpy2DAsync on the current stream (the
    copy engines; torch's `copy_` would run a strided copy as a kernel on the SMs); elsewhere `copy_`."""
    if dim == 0 or not dst.is_cuda:
        dst.copy_(src)
        return
    el = dst.element_size()
    rows, width = math.prod(dst.shape[:dim]), math.prod(dst.shape[dim:]) * el
    stream = torch.cuda.current_stream(dst.device).cuda_stream
    ptr, size = ctypes.c_void_p, ctypes.c_size_t
    pitch = dst.stride(dim - 1) * el
    args = ptr(dst.data_ptr()), size(pitch), ptr(src.data_ptr()), size(width), size(width), size(rows)
    err = _cudart().cudaMemcpy2DAsync(*args, 3, ptr(stream))  # 3: cudaMemcpyDeviceToDevice
    if err:
        raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {err} copying {rows} rows of {width} bytes")


@functools.cache
def _cudart() -> ctypes.CDLL:
    """The CUDA runtime torch already loaded (found by its soname), else the one in the nvidia wheels beside it."""
    name = f"libcudart.so.{(torch.version.cuda or '').split('.')[0]}"
    with contextlib.suppress(OSError):
        return ctypes.CDLL(name)
    with contextlib.suppress(ImportError, OSError):
        import nvidia  # the CUDA runtime wheel torch depends on

        for root in nvidia.__path__:
            for path in sorted(glob.glob(os.path.join(root, "*", "lib", f"{name}*"))):
                return ctypes.CDLL(path)
    raise RuntimeError(f"the copy-engine transport calls the CUDA runtime ({name}) and could not load it; "
                       f"use --transport nccl")  # fmt: skip


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _follow(stream, other) -> None:
    """Make `stream` wait for the work queued so far on `other` (no-op on the CPU)."""
    if stream is not None:
        stream.wait_stream(other)


def make_exchange(transport, group):
    """Transport name -> exchange: "nccl" -> None (functional collectives), "copy-engine" -> a
    `CopyEngineExchange` (push mode, q, k, v landing in head order), a `VARIANTS` name -> one with that name's
    setting changed; an exchange is returned as it is."""
    if transport is None or transport == "nccl":
        return None
    if transport in _SETTINGS:
        return CopyEngineExchange(group, **_SETTINGS[transport])
    if isinstance(transport, CopyEngineExchange):
        return transport
    raise ValueError(f"unknown all-to-all transport {transport!r}; known: {', '.join(TRANSPORTS + VARIANTS)}")

"""Block-level weight streaming: a `(module) -> module` transform that keeps a model's repeated blocks in host
memory and copies each one to the compute device just before it runs.

Contract:
    stream_blocks(model, device, prefetch=1, *, blocks=None, resident=0, persistent=True) -> model, in place
        blocks      the modules to stream, in the order they run (default: `model.double_blocks` then
                    `model.single_blocks`). Every tensor outside them is moved to `device` and stays there.
        resident    how many of the blocks stay on `device` for good, spread evenly (`resident_indices`).
        prefetch    blocks copied ahead: while block i computes, blocks i+1..i+prefetch are being copied.
                    prefetch + 1 device buffers ("slots"), each the size of the largest streamed block, hold them.
        persistent  True: the slots stay allocated and the prefetch wraps around to the first block, ready for
                    the next forward (a transformer called once per step). False: nothing stays on the device
                    between calls (a text encoder called once per prompt): the tensors outside the blocks are
                    parked too and copied in when the model is called, tensor arguments are moved to `device`,
                    and after the call the slots and that copy are freed; the outputs stay on `device`.
    streamer_of(model) -> BlockStreamer | None
    park(block, pin) -> ParkedBlock      one block's tensors packed into one host buffer (pinned when `pin`)

At rest a streamed block's parameters and buffers are views into its host buffer, so `state_dict()` reads the
weights as they are. A forward pre-hook binds them to views into a slot; a forward hook binds them back.
On CUDA the copies run on a side stream: the compute stream waits on a per-copy event before a block runs,
and a slot is overwritten only after an event recorded when its previous block finished. Elsewhere (the CPU,
used by the tests) the same bookkeeping runs with synchronous copies.

Exact: a streamed model computes the same function as the plain one, bit for bit (same tensors, same kernels;
only where the weights wait changes). Any block works, whatever its tensors: bf16 Linear weights, Fp8Linear's
e4m3 `weight` and fp32 `weight_scale` buffers, 4-bit packed weights. Not for torch.compile or CUDA graphs: the
hooks rebind tensors between calls. Do not `.to()` a streamed model.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 256  # bytes: each tensor starts 256-byte aligned in a block's buffer, so every dtype view is aligned
PAGE = 4096  # host buffers are page-aligned before cudaHostRegister
_PARKED = "_fluxrt_parked"  # attribute of a parked block: its ParkedBlock
_STREAMER = "_fluxrt_streamer"  # attribute of a streamed model: its BlockStreamer


def resident_indices(n: int, k: int) -> list[int]:
    """k of n block positions, spread evenly (k = 0: none, k >= n: all), so that streamed copies can overlap
    the compute of the resident blocks between them."""
    k = max(0, min(k, n))
    return sorted({i * n // k for i in range(k)}) if k else []


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Flux2 (double, then single: the order they run in)."""
    blocks = [*getattr(model, "double_blocks", ()), *getattr(model, "single_blocks", ())]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no double_blocks / single_blocks: pass blocks=")
    return blocks


# ------------------------------------------------------------------------------------------------ parking
@dataclass(frozen=True)
class _Entry:
    module: nn.Module
    name: str
    is_param: bool
    offset: int  # bytes into the block's buffer
    dtype: torch.dtype
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def _align(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def _tensors(block: nn.Module):
    """(module, name, tensor, is_param) of every parameter and buffer under `block`."""
    for m in block.modules():
        yield from _tensors_of(m)


def _register(buf: torch.Tensor, nbytes: int) -> bool:
    """Page-lock `nbytes` from `buf`'s start in place (exact size, unlike the pinned allocator's power-of-2 blocks)."""
    try:
        err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0))
    except (AttributeError, RuntimeError, AssertionError):
        return False
    if err:
        return False
    weakref.finalize(buf, _unregister, buf.data_ptr())
    return True


def _unregister(ptr: int) -> None:
    with contextlib.suppress(Exception):  # at interpreter shutdown CUDA may be gone already
        torch.cuda.cudart().cudaHostUnregister(ptr)


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host tensor of `nbytes`; pinned (page-locked) when `pin`, so that copies from it are async."""
    if not pin:
        return torch.empty(nbytes, dtype=torch.uint8)
    whole = _align(nbytes, PAGE)  # whole pages inside `raw`: no page is shared with another registration
    raw = torch.empty(whole + PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % PAGE
    buf = raw[start : start + nbytes]
    return buf if _register(buf, whole) else torch.empty(nbytes, dtype=torch.uint8).pin_memory()


class ParkedBlock:
    """Tensors of one block (or of everything outside the blocks) packed into one host buffer (`host`), with
    views to bind them. `found` lists (module, name, tensor, is_param) as `_tensors` yields them."""

    def __init__(self, found: list, pin: bool):
        entries, offset, seen = [], 0, {}
        for m, name, t, is_param in found:
            if id(t) in seen:  # a tensor shared inside the block gets one place
                entries.append(_Entry(m, name, is_param, seen[id(t)], t.dtype, t.shape))
                continue
            seen[id(t)] = offset
            entries.append(_Entry(m, name, is_param, offset, t.dtype, t.shape))
            offset = _align(offset + t.numel() * t.element_size())
        self.entries, self.nbytes = entries, max(offset, ALIGN)
        self.host = host_buffer(self.nbytes, pin)
        with torch.no_grad():
            for e, (_, _, t, _) in zip(entries, found):
                self.view(self.host, e).copy_(t)  # from any device; the block's old tensors are freed by bind
        self.bind(self.views(self.host))

    @staticmethod
    def view(buf: torch.Tensor, e: _Entry) -> torch.Tensor:
        return buf[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode(False):  # views bound as weights must stay usable outside inference mode
            return [self.view(buf, e) for e in self.entries]

    def bind(self, views: list[torch.Tensor]) -> None:
        """Make the block's parameters and buffers the given views (same order as `entries`)."""
        for e, v in zip(self.entries, views):
            if e.is_param:
                e.module._parameters[e.name].data = v
            else:
                e.module._buffers[e.name] = v


def park(block: nn.Module, pin: bool = False) -> ParkedBlock:
    """Pack `block`'s tensors into one host buffer and bind the block to it (once; a parked block is reused)."""
    parked = getattr(block, _PARKED, None)
    if parked is None:
        parked = ParkedBlock(list(_tensors(block)), pin)
        object.__setattr__(block, _PARKED, parked)  # a plain attribute, not a submodule
    return parked


def _unpark(block: nn.Module, device: torch.device) -> None:
    """Give a parked block ordinary tensors of its own on `device` again."""
    parked = getattr(block, _PARKED, None)
    if parked is not None:
        parked.bind([v.to(device, copy=True) for v in parked.views(parked.host)])
        object.__delattr__(block, _PARKED)
    block.to(device)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _refresh(block: nn.Module) -> None:
    """Tell each module that its tensors changed device: an identity `_apply`, which is where device-dependent
    dispatch is decided (Fp8Linear's impl="auto" picks scaled_mm on a GPU, the reference product elsewhere)."""
    _refresh_modules(block.modules())


def _outside(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The modules of `model` that are not inside any of `blocks`."""
    inside = {id(m) for b in blocks for m in b.modules()}
    return [m for m in model.modules() if id(m) not in inside]


def _to_device(x, device: torch.device):
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


# ---------------------------------------------------------------------------------------------- streaming
class BlockStreamer:
    """The hooks and bookkeeping behind `stream_blocks` (see the module docstring)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], device, prefetch: int, resident: int,
                 persistent: bool):  # fmt: skip
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.persistent = persistent
        for m in _cache_holders([model, *blocks]):
            m.release_cache()  # a layer that ran resident may hold its codes only in its kernel's copy: get them back
        keep = set(resident_indices(len(blocks), resident))
        for i in sorted(keep):
            _unpark(blocks[i], self.device)
        self.blocks = [b for i, b in enumerate(blocks) if i not in keep]
        self.resident = [blocks[i] for i in sorted(keep)]
        self.parked = [park(b, pin=self.cuda) for b in self.blocks]
        self.host_views = [p.views(p.host) for p in self.parked]
        # Layers with a device cache built from their weights at their first call (Int4Linear's repacked copy of
        # its codes for the tinygemm kernel): on a streamed block that copy would stay on the device, so it is
        # released after every forward, and the layer keeps its codes, which the hooks rebind every call.
        self.caches = [_cache_holders([b]) for b in self.blocks]
        self.rest = None  # persistent=False: the tensors outside the blocks, parked as one more buffer
        self.rest_caches: list[nn.Module] = []  # persistent=False: the cache holders among them, released likewise
        if persistent:
            for m in _outside(model, blocks):
                m._apply(functools.partial(_to_device, device=self.device), recurse=False)
        else:
            found = [t for m in _outside(model, blocks) for t in _tensors_of(m)]
            self.rest = ParkedBlock(found, pin=self.cuda) if found else None
            self.rest_caches = [m for m in _outside(model, blocks) if _holds_cache(m)]
        for m in [*self.rest_caches, *(m for ms in self.caches for m in ms)]:
            m.keep_codes = True
        n = len(self.blocks)
        self.num_slots = min(max(prefetch, 0) + 1, n)
        self.prefetch = self.num_slots - 1
        self.slot_bytes = max((p.nbytes for p in self.parked), default=0)
        self.slots: list[torch.Tensor] = []  # allocated on first use
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.slot_of: list[int | None] = [None] * n
        self.occupant: list[int | None] = [None] * self.num_slots
        self.last_use = [0] * self.num_slots
        self.ready: list = [None] * n  # CUDA event: block k's copy is done
        self.free: list = [None] * self.num_slots  # CUDA event: the slot's last block finished computing
        self.refreshed: set[int] = set()
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.loads, self.copied_bytes, self.clock = 0, 0, 0  # copies issued and their bytes; slot use counter
        self.log: list[tuple[str, int]] | None = None  # set to [] to record ("load" | "run", k) events
        self.handles = []
        for k, b in enumerate(self.blocks):
            self.handles.append(b.register_forward_pre_hook(self._pre_hook(k)))
            self.handles.append(b.register_forward_hook(self._post_hook(k), always_call=True))
        if not persistent:
            self.handles.append(model.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(model.register_forward_hook(self._exit, with_kwargs=True, always_call=True))

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the device per forward when no slot is reused (every streamed block once)."""
        return sum(p.nbytes for p in self.parked)

    @property
    def device_bytes(self) -> int:
        """Device memory the slots take while allocated."""
        return self.num_slots * self.slot_bytes

    # ----------------------------------------------------------------------------------------- slots
    def _ensure_slots(self) -> None:
        if self.slots:
            return
        with torch.inference_mode(False):
            self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                          for _ in range(self.num_slots)]  # fmt: skip
        if self.cuda:  # the slots' memory may have been in use by the compute stream a moment ago
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def release(self) -> None:
        """Free the slots (the next forward allocates them again); streamed blocks stay bound to host memory."""
        if self.cuda and self.slots:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self.slots, self._views = [], {}
        self.slot_of = [None] * len(self.blocks)
        self.occupant, self.free = [None] * self.num_slots, [None] * self.num_slots
        self.ready = [None] * len(self.blocks)

    def _slot_views(self, k: int, s: int) -> list[torch.Tensor]:
        if (k, s) not in self._views:
            self._views[(k, s)] = self.parked[k].views(self.slots[s])
        return self._views[(k, s)]

    def _pick_slot(self, protect: set[int]) -> int:
        """A free slot, else the least recently used one whose block is not about to run."""
        for s, occ in enumerate(self.occupant):
            if occ is None:
                return s
        candidates = [s for s, occ in enumerate(self.occupant) if occ not in protect]
        return min(candidates, key=lambda s: self.last_use[s])

    def _load(self, k: int, protect: set[int]) -> None:
        """Start copying block k into a slot (no-op when it is already in one)."""
        if self.slot_of[k] is not None:
            return
        s = self._pick_slot(protect)
        old = self.occupant[s]
        if old is not None:
            self.slot_of[old] = None
        self.occupant[s], self.slot_of[k] = k, s
        src, dst = self.parked[k].host, self.slots[s][: self.parked[k].nbytes]
        if self.cuda:
            if self.free[s] is not None:
                self.copy_stream.wait_event(self.free[s])  # the slot's previous block has finished reading it
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(src, non_blocking=True)
                self.ready[k] = torch.cuda.Event()
                self.ready[k].record(self.copy_stream)
        else:
            dst.copy_(src)
        self.loads += 1
        self.copied_bytes += self.parked[k].nbytes
        if self.log is not None:
            self.log.append(("load", k))

    def _upcoming(self, k: int) -> list[int]:
        """The blocks to prefetch while block k runs (wrapping to the next forward when persistent)."""
        n, out = len(self.blocks), []
        for j in range(1, self.prefetch + 1):
            if k + j >= n and not self.persistent:
                break
            if (k + j) % n == k:
                break
            out.append((k + j) % n)
        return out

    # ----------------------------------------------------------------------------------------- hooks
    def _pre_hook(self, k: int):
        def hook(module, args):
            with torch.no_grad():
                self._ensure_slots()
                self._load(k, {k})
                s = self.slot_of[k]
                self.clock += 1
                self.last_use[s] = self.clock
                if self.cuda:
                    torch.cuda.current_stream(self.device).wait_event(self.ready[k])
                self.parked[k].bind(self._slot_views(k, s))
                if k not in self.refreshed:
                    _refresh(self.blocks[k])
                    self.refreshed.add(k)
                protect = {k}
                for nxt in self._upcoming(k):  # copies of the next blocks overlap this block's compute
                    protect.add(nxt)
                    self._load(nxt, protect)
            if self.log is not None:
                self.log.append(("run", k))

        return hook

    def _post_hook(self, k: int):
        def hook(module, args, output):
            s = self.slot_of[k]
            if self.cuda and s is not None:
                self.free[s] = torch.cuda.Event()
                self.free[s].record(torch.cuda.current_stream(self.device))
            self.parked[k].bind(self.host_views[k])  # at rest the block reads its host buffer
            for m in self.caches[k]:
                m.release_cache()

        return hook

    def _enter(self, module, args, kwargs):
        """persistent=False: copy the rest of the model in and move tensor arguments to the device."""
        if self.rest is not None:
            with torch.inference_mode(False):
                buf = torch.empty(self.rest.nbytes, dtype=torch.uint8, device=self.device)
            buf.copy_(self.rest.host, non_blocking=True)  # on the compute stream: ordered before the forward
            self.rest.bind(self.rest.views(buf))
            _refresh_modules({id(e.module): e.module for e in self.rest.entries}.values())
        move = functools.partial(_to_device, device=self.device)
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    def _exit(self, module, args, kwargs, output):
        if self.rest is not None:
            self.rest.bind(self.rest.views(self.rest.host))
        for m in self.rest_caches:
            m.release_cache()
        self.release()

    def remove(self) -> None:
        """Remove the hooks (the blocks stay parked in host memory)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self.release()


def _tensors_of(m: nn.Module):
    """(module, name, tensor, is_param) of `m`'s own parameters and buffers (not its children's)."""
    for name, t in m._parameters.items():
        if t is not None:
            yield m, name, t, True
    for name, t in m._buffers.items():
        if t is not None:
            yield m, name, t, False


def _holds_cache(m: nn.Module) -> bool:
    """A layer that keeps a device cache derived from its weights: it has `release_cache()` (drop the cache, its
    weights stay usable) and `keep_codes` (True: never free its weights in favour of the cache)."""
    return callable(getattr(m, "release_cache", None)) and hasattr(m, "keep_codes")


def _cache_holders(roots: list[nn.Module]) -> list[nn.Module]:
    """The cache holders under `roots`, each once."""
    return list({id(m): m for r in roots for m in r.modules() if _holds_cache(m)}.values())


def _refresh_modules(modules) -> None:
    for m in modules:
        m._apply(_same, recurse=False)


def stream_blocks(model: nn.Module, device, prefetch: int = 1, *, blocks: list[nn.Module] | None = None,
                  resident: int = 0, persistent: bool = True) -> nn.Module:  # fmt: skip
    """Stream `model`'s blocks from host memory to `device` (module docstring); returns the model."""
    if getattr(model, _STREAMER, None) is not None:
        raise ValueError(f"{type(model).__name__} is already streamed")
    blocks = default_blocks(model) if blocks is None else list(blocks)
    if not blocks:
        raise ValueError("stream_blocks needs at least one block")
    streamer = BlockStreamer(model, blocks, torch.device(device), prefetch, resident, persistent)
    object.__setattr__(model, _STREAMER, streamer)
    return model


def streamer_of(model: nn.Module) -> BlockStreamer | None:
    return getattr(model, _STREAMER, None)

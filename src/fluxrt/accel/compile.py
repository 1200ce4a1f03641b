"""torch.compile and CUDA graphs for a built Flux2: lossless `(module) -> module` transforms.

Contract:
    compile_transformer(model, mode=None, *, fullgraph=True, dynamic=False, scope="blocks", backend="inductor",
                        fused=True)
        -> the same model, compiled in place (state_dict keys and type unchanged).
        fused=True, on a CUDA model with Triton: every block's QK-norm + RoPE runs fluxrt.accel.norm_rope's fused
            kernel (FUSED_NORM_ROPE; each QKNorm's `kernel` attribute), which computes the same function up to
            fp32 rounding order, as inductor's own fusions do; elsewhere the model's ops are compiled as they are.
        scope="blocks": each double and single block is compiled (regional compilation). Blocks of one class
            share one compiled graph per input shape, so a 56-block dev compiles two graphs, not 56; embedders,
            modulations and the final layer stay eager (under 1% of the FLOPs).
        scope="model": the whole forward is one graph (Flux2.forward has no graph break; tested with
            fullgraph=True), which also fuses the embedders and RoPE tables, at a longer compile.
        dynamic=False specialises on shapes: a new (L_img, L_txt, batch) compiles once more, and a repeated
        shape never recompiles. mode "reduce-overhead" / "max-autotune" add torch's CUDA graphs (CUDA only).
    decompile(model) -> model          drops what compile_transformer added (benchmarks switch variants)
    use_fused_kernels(model, kernel)   sets (kernel name) or clears (None) the blocks' QK-norm + RoPE kernel
    CUDAGraphStep(model)(*args)        one manually captured CUDA graph per input signature; each call copies
                                       the inputs into static buffers, replays, and returns a fresh output

The klein-9B-KV path (`forward_kv_extract`, then `forward(..., kv=...)`) compiles too, without graph breaks,
but its K/V dict is keyed by block, so those steps trace one graph per block (and past dynamo's recompile
limit, 8 by default, the remaining blocks run eagerly); CUDAGraphStep takes tensors only, so not `kv`.
"""

from __future__ import annotations

import torch
from torch import nn

FUSED_NORM_ROPE = "triton-blhd"  # fluxrt.accel.norm_rope, output in the (B, L, H, D) order attention reads best
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # these capture CUDA graphs: meaningless off CUDA
SCOPES = ("blocks", "model")


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def compile_regions(model: nn.Module, scope: str) -> list[nn.Module]:
    """The modules that `scope` compiles: every block (of Flux2 or any model with those two lists), or the model."""
    if scope not in SCOPES:
        raise ValueError(f"unknown compile scope {scope!r}; known: {', '.join(SCOPES)}")
    if scope == "model":
        return [model]
    blocks = [*getattr(model, "double_blocks", ()), *getattr(model, "single_blocks", ())]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no double_blocks / single_blocks to compile; use scope='model'")
    return blocks


class CompilerMissing(OSError):
    """torch inductor needs a C++ compiler to compile for the CPU, and none was found."""


def check_cpu_compiler() -> str:
    """The C++ compiler inductor will use for CPU code; raises CompilerMissing with the reason when there is none."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - inductor raises its own types for a missing or unusable compiler
        raise CompilerMissing(f"compiling for the CPU needs a C++ compiler (g++ or clang++; $CXX picks one) and "
                              f"torch found none usable ({type(e).__name__}: {e}); run without --compile") from None  # fmt: skip


def use_fused_kernels(model: nn.Module, kernel: str | None = FUSED_NORM_ROPE) -> int:
    """Point every QKNorm of `model` at `kernel` (a registered norm-rope kernel; None: back to the process's
    choice, the reference by default); returns how many. Only the attribute changes, never a weight."""
    from ..models.attention import NORM_ROPE
    from ..models.transformer import QKNorm
    from . import norm_rope

    if kernel is not None:
        NORM_ROPE.check(kernel)
        if kernel in norm_rope.KERNELS and norm_rope.AVAILABLE:
            norm_rope.kernels()  # Triton and the triton_ops, imported before any tracing
    norms = [m for m in model.modules() if isinstance(m, QKNorm)]
    for m in norms:
        if kernel is None:
            m.__dict__.pop("kernel", None)
        else:
            m.kernel = kernel
    return len(norms)


def fused_kernels_available(model: nn.Module) -> bool:
    """The fused kernels run on this model: it is on a CUDA device and Triton imports."""
    from .norm_rope import AVAILABLE

    return AVAILABLE and _device_of(model).type == "cuda"


def compile_transformer(model: nn.Module, mode: str | None = None, *, fullgraph: bool = True, dynamic: bool = False,
                        scope: str = "blocks", backend="inductor", fused: bool = True) -> nn.Module:  # fmt: skip
    """Compile `model` in place with static shapes (module docstring); returns it. Lossless up to fp rounding.

    On the CPU with inductor, a missing C++ compiler raises CompilerMissing here, not at the first call.
    """
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; known: {', '.join(str(m) for m in MODES)}")
    if mode in _CUDA_GRAPH_MODES and _device_of(model).type != "cuda":
        raise ValueError(f"compile mode {mode!r} captures CUDA graphs; the model is on {_device_of(model)}")
    if backend == "inductor" and _device_of(model).type == "cpu":
        check_cpu_compiler()
    if fused and backend == "inductor" and fused_kernels_available(model):
        use_fused_kernels(model)
    kwargs = {"fullgraph": fullgraph, "dynamic": dynamic, "backend": backend}
    if mode not in (None, "default"):
        kwargs["mode"] = mode
    for region in compile_regions(model, scope):
        # a region may ask inductor for options (OverlappedSingleBlock: keep its collectives' overlap); torch takes
        # a mode or options, not both, so a mode is passed as its options with the region's added
        extra = getattr(region, "compile_options", None)
        if extra and backend == "inductor":
            from torch._inductor import list_mode_options

            args = {k: v for k, v in kwargs.items() if k != "mode"}
            mode_options = list_mode_options(kwargs["mode"], dynamic) if "mode" in kwargs else {}
            region.compile(**args, options=mode_options | extra)
        else:
            region.compile(**kwargs)  # nn.Module.compile: wraps __call__ in place, keeps the module and its keys
    return model


def decompile(model: nn.Module) -> nn.Module:
    """Undo `compile_transformer` on every submodule (the compiled code stays in torch's caches)."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    use_fused_kernels(model, None)
    return model


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


class CUDAGraphStep(nn.Module):
    """Run `model` through CUDA graphs captured once per input signature (shapes, dtypes, which args are None).

    Arguments must be tensors on the model's CUDA device or None. Each call copies them into the graph's static
    inputs, replays, and clones the static output, so results never alias later calls. All captures share one
    memory pool. Capture runs `warmup` eager calls on a side stream first (cuBLAS handles, compiled code,
    autotuning), so wrap a compiled model only after its shapes compile without recompiles. It stands in for the
    transformer in a pipeline (`fluxrt generate --cuda-graph`): `cfg` is the model's, and the klein KV-cache
    forwards (`kv=`, `forward_kv_extract`) run without a graph.
    """

    def __init__(self, model: nn.Module, warmup: int = 2):
        super().__init__()
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphStep needs a CUDA GPU; torch sees none")
        self.model, self.warmup = model, warmup
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None

    @staticmethod
    def _signature(args) -> tuple:
        for a in args:
            if a is not None and not isinstance(a, torch.Tensor):
                raise TypeError(f"CUDAGraphStep takes tensors or None, got {type(a).__name__}")
            if isinstance(a, torch.Tensor) and a.device.type != "cuda":
                raise ValueError(f"CUDAGraphStep inputs must be on a CUDA device, got one on {a.device}")
        return tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args)

    @torch.no_grad()
    def _capture(self, args) -> tuple:
        static = [None if a is None else a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model(*static)
        return graph, static, out

    @property
    def cfg(self):
        return self.model.cfg

    def forward_kv_extract(self, *args, **kwargs):
        return self.model.forward_kv_extract(*args, **kwargs)

    def forward(self, *args: torch.Tensor | None, guidance: torch.Tensor | None = None, kv=None) -> torch.Tensor:
        """The model's positional arguments; `guidance` may also come by keyword, as samplers pass it."""
        if kv is not None:  # reference K/V vary in number and length per request: no graph
            return self.model(*args, guidance=guidance, kv=kv)
        if guidance is not None:
            args = (*args, guidance)
        key = self._signature(args)
        if key not in self._graphs:
            self._graphs[key] = self._capture(args)
        graph, static, out = self._graphs[key]
        for s, a in zip(static, args):
            if s is not None:
                s.copy_(a)
        graph.replay()
        return out.clone()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

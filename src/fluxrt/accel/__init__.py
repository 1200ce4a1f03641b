"""Speed transforms applied to a built model from outside it: compile, CUDA graphs, and (via fluxrt.quant) fp8.

`optimize(model, fp8=False, compile=False)` is the one switch a pipeline or CLI flag needs: it quantizes first
(lossy, opt-in: fp8 changes the function by about the e4m3 rounding error, see fluxrt.quant.fp8) and then
compiles (lossless up to floating-point reassociation). Each transform is also usable on its own. The step cache
(`fluxrt.accel.cache.apply_step_cache`, lossy, opt-in) changes which blocks run per step, not how they compute.
"""

from __future__ import annotations

from torch import nn

from . import attention as _attention  # noqa: F401 - registers the "cudnn" and "flash" backends
from . import norm_rope as _norm_rope  # noqa: F401 - registers the "triton" and "triton-blhd" norm-rope kernels
from .compile import CompilerMissing, CUDAGraphStep, check_cpu_compiler, compile_transformer, decompile, is_compiled


def optimize(model: nn.Module, *, fp8: bool = False, compile: bool = False, compile_mode: str | None = None,
             compile_scope: str = "blocks") -> nn.Module:  # fmt: skip
    """Apply the chosen transforms to a built transformer in place (quantize, then compile); returns it."""
    if fp8:
        from ..quant.fp8 import quantize_transformer

        quantize_transformer(model)
    if compile:
        compile_transformer(model, compile_mode, scope=compile_scope)
    return model


__all__ = [
    "CUDAGraphStep", "CompilerMissing", "check_cpu_compiler", "compile_transformer", "decompile", "is_compiled",
    "optimize",
]  # fmt: skip

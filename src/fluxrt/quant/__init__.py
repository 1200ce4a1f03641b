"""Quantized Linear replacements, applied to a built model as `(module) -> module` transforms (lossy, opt-in)."""

from .fp8 import DEFAULT_SKIP, Fp8Linear, dequantize_rowwise, fp8_linears, quantize_rowwise, quantize_transformer

__all__ = ["DEFAULT_SKIP", "Fp8Linear", "dequantize_rowwise", "fp8_linears", "quantize_rowwise", "quantize_transformer"]

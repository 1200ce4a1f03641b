"""Quantized Linear replacements, applied to a built model as `(module) -> module` transforms (lossy, opt-in).

`quantize(model, scheme)` is the one switch (schemes in `SCHEMES`: fp8, nf4, int4); `save_quantized` / `convert`
write fluxrt's quantized files, which `fluxrt.loading.load_transformer` reads back (formats.py).
"""

from .formats import SCHEMES, convert, default_skip, quantize, quantized_layers, save_quantized
from .fp8 import DEFAULT_SKIP, Fp8Linear, dequantize_rowwise, fp8_linears, quantize_rowwise, quantize_transformer
from .int4 import Int4Linear, dequantize_int4, quantize_int4
from .nf4 import Nf4Linear, dequantize_nf4, quantize_nf4

__all__ = [
    "DEFAULT_SKIP", "SCHEMES", "Fp8Linear", "Int4Linear", "Nf4Linear", "convert", "default_skip", "dequantize_int4",
    "dequantize_nf4", "dequantize_rowwise", "fp8_linears", "quantize", "quantize_int4", "quantize_nf4",
    "quantize_rowwise", "quantize_transformer", "quantized_layers", "save_quantized",
]  # fmt: skip

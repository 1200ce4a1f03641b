"""Fitting FLUX.2 into a memory budget: block streaming, a planner, and applying its plan to built components.

    stream_blocks(model, device, prefetch=1, ...)   weights in pinned host memory, copied ahead of each block
    plan_memory(spec, vram, quant=None, ...)         one budget -> formats and placements (`Plan.describe()`)
    place_transformer / place_text_encoder           apply a plan to built components (fluxrt.memory.apply)
    parse_size("24GB")                               budget strings
"""

from .plan import Plan, available_schemes, parse_size, plan_memory
from .stream import BlockStreamer, park, resident_indices, stream_blocks, streamer_of

__all__ = ["BlockStreamer", "Plan", "available_schemes", "park", "parse_size", "plan_memory", "resident_indices",
           "stream_blocks", "streamer_of"]

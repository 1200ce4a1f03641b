"""Applying a `Plan` to built components: block by block, each block is put on the device, quantized there and
either kept (resident) or parked in pinned host memory (streamed), so the device never holds more than the
plan's resident set plus one full-precision block.

Contract:
    quantize_module(module, scheme) -> module          every nn.Linear of one block / LM layer (fluxrt.quant)
    memory_plan(spec, device, dtype, quant, vram, offload, plan=None, compile=False, size=None, batch=1)
        -> Plan | None
        the plan Pipeline.load follows (None when no option asks for one); `plan` passes one made earlier
    load_devices(plan, device, te_device) -> (transformer device, text-encoder device) to load the weights to
    place_transformer(model, plan, device, materialize=None) -> model
    place_text_encoder(te, plan, device, materialize=None) -> (te, te_device, offload_between_prompts)
    apply_plan(plan, transformer, te, device, te_device, offload) -> (transformer, te, te_device, offload)

`materialize(module, prefix, device, recurse)` (benchmarks) gives a module built on the meta device real tensors on
`device` just before it is placed, so a 32B model is never whole in any one memory in full precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..request import RequestError
from .plan import Plan, check_scheme, plan_memory
from .stream import _outside, default_blocks, park, resident_indices, stream_blocks

Materialize = Callable[[nn.Module, str, torch.device, bool], None]
CPU = torch.device("cpu")


def quantize_module(module: nn.Module, scheme: str | None) -> nn.Module:
    """Quantize one transformer block or text-encoder layer with fluxrt.quant's default policy for `scheme` (its
    skip patterns match names inside a block too, so a block quantized alone ends as it would in the whole model)."""
    if scheme is None:
        return module
    try:
        from ..quant import quantize
    except ImportError:  # an install without the 4-bit layers: fp8 still works
        quantize = None
    if quantize is not None:
        return quantize(module, scheme)
    if scheme == "fp8":
        from ..quant.fp8 import quantize_transformer

        return quantize_transformer(module)
    check_scheme(scheme, ("fp8",))  # raises, naming what is missing
    return module


def memory_plan(spec, device, dtype, quant=None, vram=None, offload=None, plan: Plan | None = None,
                compile: bool = False, size=None, batch: int = 1) -> Plan | None:  # fmt: skip
    """The plan `Pipeline.load` follows, or None when neither quant, vram, offload nor a plan was given."""
    if plan is None and quant is None and vram is None and offload is None:
        return None
    if plan is None:
        device = torch.device(device)
        gpus = torch.cuda.device_count() if device.type == "cuda" else 1
        plan = plan_memory(spec, vram, quant, gpus=gpus, dtype=dtype, offload=offload, device=str(device),
                           size=size, batch=batch)  # fmt: skip
    if compile and plan.streamed:
        streamed = f"{plan.blocks - plan.resident} of {plan.blocks}"
        raise RequestError(f"--compile does not combine with streamed blocks (the plan streams {streamed}); "
                           "raise --vram or drop --compile")  # fmt: skip
    return plan


def load_devices(plan: Plan, device, te_device) -> tuple[torch.device, torch.device]:
    """Where to load the weights: straight to the device only when they stay there in the loaded format."""
    device = torch.device(device)
    t = device if plan.quant is None and not plan.streamed else CPU
    place = plan.text_encoder
    if place == "default":
        return t, torch.device(te_device)
    if plan.text_encoder_quant is None and (place == "gpu" or place.startswith("cuda:")):
        return t, device if place == "gpu" else torch.device(place)
    return t, CPU


def _to(device: torch.device):
    return lambda t: t.to(device)


def place_transformer(model: nn.Module, plan: Plan, device, materialize: Materialize | None = None) -> nn.Module:
    """Put `model` where `plan` says: outside modules and resident blocks on `device`, the rest parked and
    streamed; every block quantized on `device` first (fast on a GPU). In place; returns the model."""
    device = torch.device(device)
    blocks = default_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    for m in _outside(model, blocks):
        if materialize is not None:
            materialize(m, names[id(m)], device, False)
        m._apply(_to(device), recurse=False)
    keep = set(resident_indices(plan.blocks, plan.resident))
    for i, block in enumerate(blocks):
        if materialize is not None:
            materialize(block, names[id(block)], device, True)
        quantize_module(block.to(device), plan.quant)
        if plan.streamed and i not in keep:
            park(block, pin=device.type == "cuda")  # the device copy is freed once the block reads host memory
    if plan.streamed:
        stream_blocks(model, device, plan.prefetch, resident=plan.resident)
    return model


def place_text_encoder(te, plan: Plan, device, materialize: Materialize | None = None):
    """Put a TextEncoder where `plan` says; returns (te, the device it encodes on, offload between prompts).

    Layers are quantized on the GPU they run on ("gpu", "cuda:N") or on `device` before going to host memory
    ("stream", "offload", "cpu"). "stream" streams the decoder layers with nothing left on the device between
    prompts (`stream_blocks(..., persistent=False)`).
    """
    device, place = torch.device(device), plan.text_encoder
    if place == "default":
        raise ValueError("a plan without a memory budget leaves the text encoder where Pipeline.load puts it")
    on_gpu = place == "gpu" or place.startswith("cuda:")
    home = (device if place == "gpu" else torch.device(place)) if on_gpu else CPU  # where it rests
    decoder = te.decoder
    layers = list(decoder.layers)
    names = {id(m): n for n, m in decoder.named_modules()}
    work = home if on_gpu else device  # where each layer is made real and quantized
    for m in _outside(decoder, layers):
        if materialize is not None:
            materialize(m, names[id(m)], work, False)
        m._apply(_to(home), recurse=False)
    for layer in layers:
        if materialize is not None:
            materialize(layer, names[id(layer)], work, True)
        quantize_module(layer.to(work), plan.text_encoder_quant)
        if place == "stream":
            park(layer, pin=device.type == "cuda")
        elif not on_gpu:
            layer.to(CPU)
    if place == "stream":
        stream_blocks(decoder, device, 1, blocks=layers, persistent=False)
        return te, device, False
    return te, (device if place == "offload" else home), place == "offload"


def apply_plan(plan: Plan, transformer, te, device, te_device, offload: bool):
    """`Pipeline.load`'s last step: (transformer, te, te_device, offload_text_encoder) placed as planned."""
    place_transformer(transformer, plan, device)
    if hasattr(te, "decoder") and plan.text_encoder != "default":  # a local TextEncoder (not a remote one)
        te, te_device, offload = place_text_encoder(te, plan, device)
    return transformer, te, te_device, offload

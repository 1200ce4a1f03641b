"""The command-line side of fluxrt.memory: `--quant`, `--vram`, `--offload` and the printed plan.

    add_arguments(parser)                          the three options of `fluxrt generate`
    plan_from_args(spec, args, valid, record)      the Plan they ask for (printed on stderr), or None
    load_kwargs(args)                              what Pipeline.load takes from them
"""

from __future__ import annotations

import argparse
import sys

from ..request import RequestError
from .plan import QUANT_SCHEMES, Plan, parse_size


def _vram(text: str) -> int:
    try:
        return parse_size(text)
    except RequestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=QUANT_SCHEMES, help="quantize the transformer (lossy): fp8 (e4m3, row scales), "
                   "nf4 or int4 (4-bit); the text encoder too when --vram needs it")  # fmt: skip
    p.add_argument("--vram", type=_vram, metavar="SIZE", help="GPU memory budget, e.g. 24GB, 12GiB or 24000MB: "
                   "quantization (unless --quant fixes it), text-encoder placement and block streaming are chosen "
                   "to fit it; the plan is printed on stderr")  # fmt: skip
    p.add_argument("--offload", choices=("stream",), help="stream the transformer's blocks from pinned CPU memory "
                   "(as many stay resident as --vram allows; without --vram none)")  # fmt: skip


def plan_from_args(spec, args, valid, record: dict) -> Plan | None:
    """The plan of a generate command line for the validated request (size, batch), printed on stderr."""
    quant = args.quant or record.get("quant")  # --from keeps the quantization the image was made with
    if quant is None and args.vram is None and args.offload is None:
        return None
    from ..cli import DTYPE_NAMES, DTYPES
    from ..pipeline import MAX_BATCH, _default_dtype, parse_device
    from .apply import memory_plan

    device = parse_device(args.device)
    dtype_name = args.dtype or DTYPE_NAMES.get(record.get("dtype", ""))
    dtype = DTYPES[dtype_name] if dtype_name else _default_dtype(device)
    batch = min(len(valid.samples), MAX_BATCH)  # Pipeline.run batches up to MAX_BATCH samples of one layout
    plan = memory_plan(spec, device, dtype, quant, args.vram, args.offload, compile=getattr(args, "compile", False),
                       size=(valid.width, valid.height), batch=batch)  # fmt: skip
    print(plan.describe(), file=sys.stderr, flush=True)
    return plan


def load_kwargs(args) -> dict:
    """Pipeline.load's memory arguments: the plan printed earlier, else the options themselves."""
    return {"quant": getattr(args, "quant", None), "vram": getattr(args, "vram", None),
            "offload": getattr(args, "offload", None), "plan": getattr(args, "plan", None)}  # fmt: skip

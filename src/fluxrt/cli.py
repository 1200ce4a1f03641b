"""The `fluxrt` command line: subcommands that build one request, validate it and call the pipeline.

    fluxrt generate PROMPT [--ref IMG]... [--model M] [--seed N] [--steps N] [--guidance G] [--size WxH] ...
    fluxrt info PATH_OR_REPO_ID
    fluxrt models
    fluxrt convert PATH_OR_REPO_ID --quant fp8|nf4|int4 --out FILE.safetensors

`main(argv) -> int` never raises for bad input: it prints one line `fluxrt: error: ...` on stderr and returns 2
(1 for failures of the environment, e.g. a full disk). Written paths go to stdout, the progress bar to stderr.
The request is validated against the model's spec (read from headers) before any weights are loaded.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from PIL import Image

from . import __version__
from .config import PRESETS, ModelSpec
from .outputs import format_for, is_folder, output_paths, read_exif_tags, read_metadata, save_image
from .request import GenerationRequest, RequestError, validate

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

GENERATE_EXAMPLES = """\
examples:
  fluxrt generate "a red circle on a blue background"
  fluxrt generate "a red circle" --seed 7 --steps 24 --size 256x256 --out circle.png
  fluxrt generate "make the circle green" --ref circle.png --out green.webp
  fluxrt generate "put them side by side" --ref a.png --ref b.png --ref c.png --match-image-size 0
  fluxrt generate "a cat" --model flux.2-klein-4b --num-images 4 --out cats/
  fluxrt generate --from outputs/7_0.png --out again.png      # reproduce an image from its metadata
  fluxrt generate "a red circle" --cache 0.2                  # lossy: skip the later blocks on quiet steps
"""
INFO_EXAMPLES = """\
examples:
  fluxrt info flux2-dev.safetensors
  fluxrt info black-forest-labs/FLUX.2-klein-4B     # a repo id in the local Hugging Face cache
  fluxrt info fluxrt-shapes                         # a preset name
"""
CONVERT_EXAMPLES = """\
examples:
  fluxrt convert black-forest-labs/FLUX.2-klein-4B --quant nf4 --out klein-4b-nf4.safetensors
  fluxrt convert flux2-dev.safetensors --quant fp8 --out flux2-dev-fp8.safetensors --device cuda
  # the file loads with fluxrt.loading.load_transformer("klein-4b-nf4.safetensors"): Nf4Linear layers
"""
MODELS_EXAMPLES = """\
examples:
  fluxrt models
  HF_HUB_CACHE=/data/hub fluxrt models
"""


class UsageError(Exception):
    """argparse found bad syntax; main() turns it into one error line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block and exit
        raise UsageError(message)


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    try:
        return (int(w), int(h)) if sep else (int(w), int(w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use WIDTHxHEIGHT, e.g. 1024x768") from None


def _device(text: str) -> str:
    from .pipeline import parse_device

    try:
        return str(parse_device(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def threshold_arg(text: str) -> float:
    """argparse type of --cache (generate and serve): a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"invalid step cache threshold {text!r}: a number > 0, e.g. 0.1")
    return value


# ------------------------------------------------------------------------------------------------- parser
def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt and optional reference images",
                       epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("prompt", nargs="?", help="what to draw (optional with --from)")
    p.add_argument("--ref", action="append", dest="refs", metavar="IMG", help="a reference image (repeat for more)")
    p.add_argument("--model", help="preset name, local file/folder or cached repo id (default: fluxrt-shapes)")
    p.add_argument("--preset", help="preset of a local checkpoint whose shapes fit several (klein / klein base)")
    p.add_argument("--seed", type=int, help="random seed of the first image (default: random)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--negative", help="negative prompt (CFG models only)")
    p.add_argument("--size", type=_size, metavar="WxH", help="output size in pixels, multiples of 16")
    p.add_argument("--match-image-size", type=int, metavar="K", help="output size of reference K (0-based)")
    p.add_argument("--num-images", type=int, default=1, metavar="N", help="images to generate (seeds N, N+1, ...)")
    p.add_argument("--out", metavar="PATH", help="output file (or folder/); default outputs/<seed>_<n>.png")
    p.add_argument("--format", choices=("png", "jpeg", "jpg", "webp"), help="image format (default: from --out)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--from", dest="from_image", metavar="IMAGE",
                   help="reproduce IMAGE from its metadata (model, prompt, seed, steps, guidance, size, dtype; pass "
                   "its references again with --ref); other flags override")  # fmt: skip
    p.add_argument("--device", type=_device, help="device of every component (default: cuda if any, else cpu)")
    p.add_argument("--text-encoder-device", type=_device, metavar="D", help="text encoder device (default: --device)")
    p.add_argument("--text-encoder-url", metavar="URL", help="encode prompts on a `fluxrt serve --text-encoder-only` "
                   "server instead of loading the text encoder here (token: $FLUXRT_TOKEN)")  # fmt: skip
    p.add_argument("--ae-device", type=_device, metavar="D", help="autoencoder device (default: --device)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--safety", choices=("default", "filters-off"), default="default",
                   help="default: the model's safety policy (dev: NSFW + copyright/public-figure filters, watermark, "
                   "C2PA when $FLUXRT_C2PA_CERT/KEY are set); filters-off: no content filters (your licence may "
                   "then require manual review); the invisible watermark and AI tags stay on")  # fmt: skip
    p.add_argument("--c2pa-cert", metavar="PEM", help="sign outputs with a C2PA manifest: certificate chain, leaf "
                   "first (default $FLUXRT_C2PA_CERT); PNG and JPEG")  # fmt: skip
    p.add_argument("--c2pa-key", metavar="PEM", help="the signing key (default $FLUXRT_C2PA_KEY)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer's blocks (lossless; "
                   "the first image pays the compile, about a minute on a GPU; needs a C++ compiler on the CPU; on "
                   "CUDA the QK-norm + RoPE runs as one Triton kernel, fluxrt.accel.norm_rope)")  # fmt: skip
    p.add_argument("--cuda-graph", action="store_true", help="replay the transformer's forward as a CUDA graph, "
                   "captured on the first step of each image size (lossless; removes the per-kernel launch cost: "
                   "best with --compile, at small sizes and under --gpus; CUDA only, not with --cache or streamed "
                   "blocks)")  # fmt: skip
    p.add_argument("--cache", type=threshold_arg, metavar="THRESHOLD", help="step cache (lossy, off by default): on "
                   "steps whose first block changed by less than THRESHOLD (relative, e.g. 0.1) since the last full "
                   "step, reuse what the later blocks added then; higher is faster and further from the exact image")  # fmt: skip
    from .memory.options import add_arguments as add_memory_arguments
    from .parallel.generate import add_arguments as add_parallel_arguments

    add_memory_arguments(p)  # --quant, --vram, --offload
    add_parallel_arguments(p)  # --gpus, --parallel
    p.set_defaults(func=cmd_generate)


def _convert_parser(sub) -> None:
    from .quant.formats import SCHEMES

    p = sub.add_parser("convert", help="write a quantized copy of a transformer checkpoint (lossy)",
                       epilog=CONVERT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("source", metavar="PATH_OR_REPO_ID", help="an unquantized transformer checkpoint (any layout)")
    p.add_argument("--quant", required=True, choices=SCHEMES, help="fp8: e4m3 + row scales; nf4 / int4: 4-bit")
    p.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument("--device", type=_device, default="cpu", help="where to quantize (default: cpu)")
    p.add_argument("--keep", action="append", metavar="PREFIX", default=[],
                   help="also keep this module prefix or glob unquantized (repeat; the embedders, modulations and "
                   "final layer are always kept, and for fp8 the MLP products too)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from pathlib import Path

    from .quant.formats import convert, default_skip

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise RequestError(f"--out must end in .safetensors, got {args.out!r}")
    if out.exists() and not args.overwrite:
        raise RequestError(f"output {args.out!r} already exists (pass --overwrite to replace it)")
    print(convert(args.source, out, args.quant, args.device, (*default_skip(args.quant), *args.keep)), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fluxrt", description="Run the FLUX.2 image models.")
    parser.add_argument("--version", action="version", version=f"fluxrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _generate_parser(sub)
    info = sub.add_parser("info", help="describe a checkpoint (headers only)", epilog=INFO_EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    info.add_argument("source", metavar="PATH_OR_REPO_ID", help="a file, folder, cached repo id or preset name")
    info.set_defaults(func=cmd_info)
    models = sub.add_parser("models", help="list the model presets and whether their files are here",
                            epilog=MODELS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    models.set_defaults(func=cmd_models)
    _convert_parser(sub)
    verify = sub.add_parser("verify", help="check an image for the fluxrt watermark, a C2PA manifest and AI tags",
                            epilog="example:\n  fluxrt verify outputs/0_0.png --trust ca.pem",
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    verify.add_argument("image", metavar="IMAGE")
    verify.add_argument("--trust", metavar="PEM", help="extra C2PA trust anchor (root certificate)")
    verify.set_defaults(func=cmd_verify)
    from .service.cli import add_serve_parser  # argparse only: the server libraries load when `serve` runs

    add_serve_parser(sub)
    return parser


def cmd_verify(args) -> int:
    """Print the watermark, C2PA and metadata findings; exit 0 if a watermark or a valid manifest was found."""
    import json
    from pathlib import Path

    from .safety import provenance, watermark

    path = Path(args.image)
    if not path.is_file():
        raise RequestError(f"no such image file: {str(path)!r}")
    try:
        with Image.open(path) as im:
            found, accuracy = watermark.detect(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise RequestError(f"cannot read {str(path)!r} as an image: {e}") from None
    c2pa = provenance.verify(path, args.trust)
    report = {"watermark": {"found": found, "bit_accuracy": round(accuracy, 3)}, "c2pa": c2pa,
              "exif": read_exif_tags(path), "fluxrt": read_metadata(path) if path.suffix else {}}  # fmt: skip
    print(json.dumps(report, indent=1, default=str))
    return 0 if found or c2pa["valid"] else 1


# ----------------------------------------------------------------------------------------------- generate
class Progress:
    """A tqdm bar over denoising steps on stderr, created at the first step (the total is known then)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def request_from_args(args, record: dict) -> GenerationRequest:
    """The request a `generate` command line asks for; flags override what `--from` read from an image."""
    prompt = args.prompt if args.prompt is not None else record.get("prompt")
    if prompt is None:
        raise RequestError("a PROMPT is required (or --from IMAGE to reproduce an image)")
    size = args.size
    if size is None and args.match_image_size is None and record:
        size = (record.get("width"), record.get("height"))
    return GenerationRequest(
        prompt=prompt, negative=args.negative if args.negative is not None else record.get("negative"),
        width=size[0] if size else None, height=size[1] if size else None,
        steps=args.steps if args.steps is not None else record.get("steps"),
        guidance=args.guidance if args.guidance is not None else record.get("guidance"),
        seed=args.seed if args.seed is not None else record.get("seed"), num_images=args.num_images,
        refs=tuple(args.refs or ()), match_image_size=args.match_image_size,
        model=args.model if args.model is not None else record.get("model"),
        output_format=format_for(None if is_folder(args.out) else args.out, args.format),
        expected_ref_hashes=[r["sha256"] for r in record.get("refs", [])] if record else None,
    )  # fmt: skip


def _load(ref, args, record: dict, **extra):
    """The pipeline a generate command line asks for; `extra` goes to Pipeline.load (parallel ranks use it)."""
    from .memory.options import load_kwargs
    from .pipeline import Pipeline

    dtype_name = args.dtype or DTYPE_NAMES.get(record.get("dtype", ""))  # --from keeps the dtype it was made in
    return Pipeline.load(ref, device=args.device, text_encoder_device=args.text_encoder_device,
                         ae_device=args.ae_device, dtype=DTYPES[dtype_name] if dtype_name else None,
                         compile=args.compile, text_encoder_url=getattr(args, "text_encoder_url", None),
                         step_cache=step_cache_from_args(args, record), cuda_graph=getattr(args, "cuda_graph", False),
                         **load_kwargs(args), **extra)  # fmt: skip


def step_cache_from_args(args, record: dict) -> float | None:
    """--cache, else the threshold `--from`'s image was made with (a lossy setting it must keep), else off."""
    value = getattr(args, "cache", None)
    return value if value is not None else record.get("step_cache")


def cmd_generate(args) -> int:
    from .pipeline import resolve_model

    record = read_metadata(args.from_image) if args.from_image else {}
    request = request_from_args(args, record)
    preset = args.preset if args.preset or args.model else record.get("spec")  # --from: the spec it was made with
    ref = resolve_model(request.model, preset)
    valid = validate(request, ref.spec)
    paths = output_paths(args.out, [s.seed for s in valid.samples], valid.output_format)
    existing = [str(p) for p in paths if p.exists()]
    if existing and not args.overwrite:
        raise RequestError(f"output {existing[0]!r} already exists (pass --overwrite to replace it)")
    _c2pa_signer(args, {}, valid)  # bad C2PA options fail before the weights load
    from .memory.options import plan_from_args

    args.plan = plan_from_args(ref.spec, args, valid, record)  # --quant / --vram / --offload: printed on stderr
    from .parallel.generate import Launch

    launch = Launch.from_args(args, ref.spec, record)  # --gpus N or torchrun: fluxrt.parallel.generate runs ranks
    pipe = None if launch.parallel else _load(ref, args, record)
    from .safety import guard_for

    guard = guard_for(ref.spec, args.safety) if launch.is_main else None
    progress = Progress(enabled=pipe is not None and not args.quiet and sys.stderr.isatty())
    try:
        results = pipe.run(valid, on_step=progress) if pipe is not None else launch.run(ref, args, valid, record)
    finally:
        progress.close()
    if not launch.is_main:  # torchrun ranks > 0: rank 0 saves and prints
        return 0
    blocked = 0
    for result, path in zip(results, paths):
        image, decision = guard.finalize(result.image, result.record)
        if image is None:  # a flagged output is neither returned nor saved
            blocked += 1
            print(f"fluxrt: output not saved: {decision.reason}", file=sys.stderr)
            continue
        sign = _c2pa_signer(args, result.record, valid)
        print(save_image(image, path, result.record, valid.output_format, args.overwrite, sign), flush=True)
    return 3 if blocked else 0


def _c2pa_signer(args, record: dict, valid):
    """A `sign(bytes, fmt)` that embeds a C2PA manifest (AI-generated, the model, references as ingredients)."""
    import os

    cert, key = args.c2pa_cert or os.environ.get("FLUXRT_C2PA_CERT"), args.c2pa_key or os.environ.get("FLUXRT_C2PA_KEY")
    if not cert and not key:
        return None
    if not (cert and key):
        raise RequestError("C2PA signing needs both --c2pa-cert and --c2pa-key (or $FLUXRT_C2PA_CERT and _KEY)")
    if valid.output_format not in ("png", "jpeg"):
        raise RequestError(f"C2PA signing supports png and jpeg, not {valid.output_format!r}")
    from .safety.provenance import signer_for

    refs = tuple(im for s in valid.samples[:1] for im in s.refs)
    return signer_for(cert, key, str(record.get("model", "unknown model")), refs)


# ------------------------------------------------------------------------------------------- info, models
def cmd_info(args) -> int:
    from .loading.info import describe
    from .pipeline import EMBEDDED, embedded_model_path

    source = args.source
    spec = PRESETS.get(source)
    if source == EMBEDDED:
        source = embedded_model_path()
    elif spec is not None:
        if spec.repo_id is None:
            raise RequestError(f"preset {args.source!r} has no files to describe (random weights, tests only)")
        source = spec.repo_id
    print(describe(source))
    return 0


def _local_status(spec: ModelSpec) -> str:
    from .loading.errors import CheckpointError
    from .loading.hub import snapshot_path
    from .pipeline import EMBEDDED, embedded_model_path

    if spec.name == EMBEDDED:
        return f"embedded ({embedded_model_path()})"
    if spec.repo_id is None:
        return "no files (random weights, tests only)"
    try:
        snap = snapshot_path(spec.repo_id)
    except CheckpointError:
        return f"not downloaded ({spec.repo_id})"
    if spec.flow_file and not (snap / spec.flow_file).is_file():
        return f"incomplete: {spec.flow_file} missing in {snap}"
    return f"found ({snap})"


def cmd_models(args) -> int:
    from .loading.hub import hub_cache_dir

    print(f"hub cache: {hub_cache_dir()}")
    for spec in PRESETS.values():
        fixed = " (fixed)" if spec.fixed_steps_guidance else ""
        w, h = spec.default_size
        print(f"{spec.name:22} {spec.guidance_mode:9} steps {spec.default_steps:<3} guidance "
              f"{spec.default_guidance:<4g}{fixed:8} size {w}x{h:<5} {_local_status(spec)}")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------- main
def _error(message: str, code: int) -> int:
    one_line = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"fluxrt: error: {one_line}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 2 bad input, 1 other failure, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        return _error(str(e), 2)
    except ValueError as e:  # RequestError, CheckpointError, MetadataError: bad input
        return _error(str(e), 2)
    except ImportError as e:
        return _error(f"{e} (install the text extra: pip install 'fluxrt[text]')", 1)
    except OSError as e:
        return _error(str(e), 1)
    except KeyboardInterrupt:
        return _error("interrupted", 130)

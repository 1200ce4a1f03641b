"""Generation requests: one typed request, validated in one place.

Contract:
    GenerationRequest   what a caller asks for (CLI, Python API, a server); None fields take the model's defaults.
    validate(request, spec, limits=Limits()) -> ValidRequest
        every check happens here: each violation raises `RequestError` (a ValueError) whose message names the
        field, the bad value and the limit. Defaults come from the `ModelSpec` (size, steps, guidance), a missing
        seed is drawn here (so it can be recorded), reference files are opened here.
    ValidRequest.samples   one `Sample` (prompt, seed, references, negative) per output image, in output order:
        prompt i, image k -> index i * num_images + k; an int seed s gives seeds s, s + 1, ...
    ValidRequest.record(i) -> dict   the metadata written next to image i (see `fluxrt.outputs`).

References: `refs` is either one list shared by every prompt or one list per prompt. Each entry is a path or a
PIL image. Sides under 64 px and aspect ratios above 8 are rejected (the reference's `cap_min_pixels`); large
images are not rejected: the pipeline resizes them to the reference's pixel caps (2024^2 alone, 1024^2 each).
Reference hashes are SHA-256 over the RGB pixels (prefixed by the size), so a file and the same image held in
memory hash equal, and a re-encoded file with identical pixels still matches.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError

from . import __version__
from .config import ModelSpec
from .sampling.references import MAX_ASPECT, MIN_SIDE

RefLike = Union[str, os.PathLike, Image.Image]
FORMATS = ("png", "jpeg", "webp")
FORMAT_ALIASES = {"jpg": "jpeg"}
MULTIPLE = 16  # one latent token covers 16x16 output pixels
RANDOM_SEED_BOUND = 2**31  # drawn seeds stay below 2^31, like the reference's random.randrange(2**31)


class RequestError(ValueError):
    """A request field is invalid; the message names the field, the bad value and the limit."""


@dataclass(frozen=True)
class Limits:
    """What a request may ask for; a server may tighten these, a local user may loosen them."""

    max_refs: int = 10  # per sample; the FLUX.2 [dev] documentation's maximum
    max_images: int = 16  # images per request (num_images, and prompts x num_images)
    max_prompt_chars: int = 10_000
    min_side: int = 64
    max_side: int = 4096
    max_aspect: float = 8.0
    min_steps: int = 1
    max_steps: int = 200
    min_guidance: float = 0.0
    max_guidance: float = 20.0
    max_seed: int = 2**63 - 1  # torch generators take any int64 >= 0


@dataclass
class Sample:
    """One output image's inputs: prompt, seed, references (PIL, original size) and the CFG negative prompt."""

    prompt: str
    seed: int
    refs: list[Image.Image] = field(default_factory=list)
    negative: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    """What a caller asks for. `prompt` and `refs` may be per-prompt lists (a batch); `seed` is one int or one
    per image."""

    prompt: str | Sequence[str]
    negative: str | None = None  # CFG models only (klein base); the default is the empty prompt
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | Sequence[int] | None = None
    num_images: int = 1  # images per prompt
    refs: Sequence = ()  # [ref, ...] shared by all prompts, or [[ref, ...], ...] one list per prompt
    match_image_size: int | None = None  # take the output size from this reference (original size, floored to 16)
    model: str | None = None  # recorded in the metadata; None records the spec name
    output_format: str = "png"
    expected_ref_hashes: Sequence[str] | None = None  # reproduction: the refs must hash to these, in order


@dataclass(frozen=True)
class GenerationResult:
    image: Image.Image
    record: dict


@dataclass(frozen=True)
class ValidRequest:
    """A checked request with every default filled in; build it with `validate`."""

    model: str
    spec_name: str
    samples: tuple[Sample, ...]
    ref_hashes: tuple[tuple[str, ...], ...]  # per sample, aligned with samples[i].refs
    width: int
    height: int
    steps: int
    guidance: float
    output_format: str = "png"
    guidance_mode: str = "embedded"

    def record(self, i: int) -> dict:
        """The JSON-able metadata of image i: enough to reproduce it with the same model and references."""
        s = self.samples[i]
        rec = {
            "fluxrt_version": __version__, "model": self.model, "spec": self.spec_name, "prompt": s.prompt,
            "seed": s.seed, "steps": self.steps, "guidance": self.guidance, "width": self.width,
            "height": self.height,
            "refs": [{"sha256": h, "size": list(im.size)} for h, im in zip(self.ref_hashes[i], s.refs)],
        }  # fmt: skip
        if self.guidance_mode == "cfg":
            rec["negative"] = s.negative
        return rec


# ------------------------------------------------------------------------------------------------ helpers
def _fail(message: str):
    raise RequestError(message)


def _int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        _fail(f"{name} {value} is out of range {lo}..{hi}")
    return value


def _number(name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(f"{name} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        _fail(f"{name} {value:g} is out of range {lo:g}..{hi:g}")
    return float(value)


def _text(name: str, value, limits: Limits, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        _fail(f"{name} must be a string, got {value!r}")
    if not allow_empty and not value.strip():
        _fail(f"{name} is empty: {value!r}")
    if len(value) > limits.max_prompt_chars:
        _fail(f"{name} has {len(value)} characters, more than the limit {limits.max_prompt_chars}")
    return value


def image_sha256(img: Image.Image) -> str:
    """SHA-256 of an image's RGB pixels, prefixed by its size (equal for a file and the same image in memory)."""
    rgb = img.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()


def load_reference(ref: RefLike, name: str) -> Image.Image:
    """A reference as an RGB PIL image (a path is opened and fully read); errors name the path."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if not isinstance(ref, (str, os.PathLike)):
        _fail(f"{name} must be a path or a PIL image, got {ref!r}")
    path = Path(ref).expanduser()
    if not path.is_file():
        _fail(f"{name}: no such file: {str(ref)!r}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError(f"{name}: cannot read {str(ref)!r} as an image ({e})") from None


def _check_reference(img: Image.Image, name: str) -> None:
    """The reference's `cap_min_pixels` rule: sides >= 64 px, aspect ratio <= 8 (larger images are resized later)."""
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        _fail(f"{name} is {w}x{h}: both sides must be at least {MIN_SIDE} px")
    if max(w / h, h / w) > MAX_ASPECT:
        _fail(f"{name} is {w}x{h}: aspect ratio {max(w / h, h / w):.3g} is above {MAX_ASPECT}")


# ----------------------------------------------------------------------------------------------- fields
def _prompts(req: GenerationRequest, limits: Limits) -> list[str]:
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        _fail("prompt: no prompt given")
    return [_text("prompt" if len(prompts) == 1 else f"prompt[{i}]", p, limits) for i, p in enumerate(prompts)]


def _negative(req: GenerationRequest, spec: ModelSpec, limits: Limits) -> str:
    if req.negative is None:
        return ""
    if spec.guidance_mode != "cfg":
        _fail(f"negative {req.negative!r}: a negative prompt needs a CFG model; {spec.name} uses "
              f"{spec.guidance_mode} guidance")  # fmt: skip
    return _text("negative", req.negative, limits, allow_empty=True)


def _seeds(req: GenerationRequest, n: int, limits: Limits) -> list[int]:
    if req.seed is None:
        base = random.randrange(RANDOM_SEED_BOUND)
        return [base + i for i in range(n)]
    if isinstance(req.seed, (int,)) and not isinstance(req.seed, bool):
        _int("seed", req.seed, 0, limits.max_seed - (n - 1))
        return [req.seed + i for i in range(n)]
    if isinstance(req.seed, (str, bytes)) or not isinstance(req.seed, Sequence):
        _fail(f"seed must be an integer or a list of integers, got {req.seed!r}")
    seeds = list(req.seed)
    if len(seeds) != n:
        _fail(f"seed: {len(seeds)} seeds for {n} images")
    return [_int(f"seed[{i}]", s, 0, limits.max_seed) for i, s in enumerate(seeds)]


def _is_ref(x) -> bool:
    return isinstance(x, (str, os.PathLike, Image.Image))


def _ref_lists(req: GenerationRequest, n_prompts: int) -> list[tuple[str, list]]:
    """[(field name, raw refs)] per prompt: a flat list is shared, a list of lists is per prompt."""
    refs = [] if req.refs is None else ([req.refs] if _is_ref(req.refs) else list(req.refs))
    if all(_is_ref(r) for r in refs):
        return [("refs", refs)] * n_prompts
    if not all(isinstance(r, Sequence) and not _is_ref(r) for r in refs):
        _fail(f"refs must be a list of images or one list of images per prompt, got {req.refs!r}")
    if len(refs) != n_prompts:
        _fail(f"refs: {len(refs)} reference lists for {n_prompts} prompts")
    return [(f"refs[{i}]", list(r)) for i, r in enumerate(refs)]


def _references(req: GenerationRequest, n_prompts: int, limits: Limits) -> list[tuple[list, tuple[str, ...]]]:
    """Per prompt: (RGB images, their hashes); shared lists are loaded once."""
    loaded: dict[int, tuple[list, tuple[str, ...]]] = {}
    out = []
    for name, raw in _ref_lists(req, n_prompts):
        if id(raw) not in loaded:
            if len(raw) > limits.max_refs:
                _fail(f"{name}: {len(raw)} reference images, more than the limit {limits.max_refs}")
            images = []
            for j, r in enumerate(raw):
                images.append(load_reference(r, f"{name}[{j}]"))
                _check_reference(images[-1], f"{name}[{j}]" + ("" if isinstance(r, Image.Image) else f" {str(r)!r}"))
            loaded[id(raw)] = (images, tuple(image_sha256(im) for im in images))
        out.append(loaded[id(raw)])
    return out


def _check_size(width: int, height: int, limits: Limits, origin: str = "") -> tuple[int, int]:
    _int("width", width, 0, 1 << 62)
    _int("height", height, 0, 1 << 62)
    for name, v in (("width", width), ("height", height)):
        if v % MULTIPLE:
            _fail(f"{name} {v}{origin} is not a multiple of {MULTIPLE}")
        if not limits.min_side <= v <= limits.max_side:
            _fail(f"{name} {v}{origin} is out of range {limits.min_side}..{limits.max_side}")
    if max(width / height, height / width) > limits.max_aspect:
        ratio = max(width / height, height / width)
        _fail(f"size {width}x{height}{origin}: aspect ratio {ratio:.3g} is above {limits.max_aspect:g}")
    return width, height


def _size(req: GenerationRequest, spec: ModelSpec, refs: list, limits: Limits) -> tuple[int, int]:
    k = req.match_image_size
    if k is None:
        w, h = spec.default_size
        return _check_size(req.width if req.width is not None else w, req.height if req.height is not None else h,
                           limits)  # fmt: skip
    if req.width is not None or req.height is not None:
        _fail(f"match_image_size {k!r} and a size ({req.width}x{req.height}) were both given: pick one")
    fewest = min(len(images) for images, _ in refs)
    if not fewest:
        _fail(f"match_image_size {k!r} needs reference images, none were given")
    _int("match_image_size", k, 0, fewest - 1)
    sizes = {images[k].size for images, _ in refs}
    if len(sizes) > 1:
        _fail(f"match_image_size {k}: the prompts' references {k} differ in size ({sorted(sizes)})")
    w, h = sizes.pop()
    return _check_size(w // MULTIPLE * MULTIPLE, h // MULTIPLE * MULTIPLE, limits, f" (from reference {k}, {w}x{h})")


def _steps_guidance(req: GenerationRequest, spec: ModelSpec, limits: Limits) -> tuple[int, float]:
    steps = spec.default_steps if req.steps is None else req.steps
    guidance = spec.default_guidance if req.guidance is None else req.guidance
    steps = _int("steps", steps, limits.min_steps, limits.max_steps)
    guidance = _number("guidance", guidance, limits.min_guidance, limits.max_guidance)
    if spec.fixed_steps_guidance and steps != spec.default_steps:
        _fail(f"steps {steps}: {spec.name} is distilled to run exactly {spec.default_steps} steps")
    if spec.fixed_steps_guidance and guidance != spec.default_guidance:
        _fail(f"guidance {guidance:g}: {spec.name} is distilled for guidance {spec.default_guidance:g} only")
    return steps, guidance


def output_format(value: str) -> str:
    """'png' | 'jpeg' | 'webp' ('jpg' accepted), case-insensitive."""
    fmt = FORMAT_ALIASES.get(str(value).lower(), str(value).lower())
    if fmt not in FORMATS:
        _fail(f"output_format {value!r} is not one of {', '.join(FORMATS)}")
    return fmt


def _check_expected_hashes(expected, refs: list) -> None:
    if expected is None:
        return
    expected = list(expected)
    got = list(refs[0][1]) if refs else []
    if len(got) != len(expected):
        _fail(f"refs: {len(got)} reference images given, the image to reproduce was made with {len(expected)}")
    for j, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            _fail(f"refs[{j}] has sha256 {g[:16]}..., the image to reproduce used {str(e)[:16]}...")


# ----------------------------------------------------------------------------------------------- validate
def validate(request: GenerationRequest, spec: ModelSpec, limits: Limits | None = None) -> ValidRequest:
    """Check every field of `request` against `spec` and `limits`; fill in defaults; open reference files."""
    limits = limits or Limits()
    prompts = _prompts(request, limits)
    num = _int("num_images", request.num_images, 1, limits.max_images)
    if len(prompts) * num > limits.max_images:
        _fail(f"{len(prompts)} prompts x {num} images = {len(prompts) * num} images, more than {limits.max_images}")
    negative = _negative(request, spec, limits)
    steps, guidance = _steps_guidance(request, spec, limits)
    fmt = output_format(request.output_format)
    refs = _references(request, len(prompts), limits)
    _check_expected_hashes(request.expected_ref_hashes, refs)
    width, height = _size(request, spec, refs, limits)
    seeds = _seeds(request, len(prompts) * num, limits)
    samples, hashes = [], []
    for i, (p, (images, h)) in enumerate(zip(prompts, refs)):
        for k in range(num):
            samples.append(Sample(p, seeds[i * num + k], images, negative))
            hashes.append(h)
    model = spec.name if request.model is None else str(request.model)
    return ValidRequest(model, spec.name, tuple(samples), tuple(hashes), width, height, steps, guidance, fmt,
                        spec.guidance_mode)  # fmt: skip

"""HTTP input -> one validated request; jobs -> JSON. Strict: unknown fields, wrong types and duplicates are 400s.

Contract:
    OpenAIGeneration            the JSON body of POST /v1/images/generations (pydantic, extra fields forbidden)
    read_form(request, fields, limits) -> (values: {name: str}, images: [RGB PIL])
        multipart or urlencoded forms; text fields must be in `fields` and appear once; files only as `image`,
        `image[]` or `image[N]` (decoded by `images.decode_upload`, in the order sent)
    form_values(values, kinds) -> dict   text -> int / float / str per `kinds`, errors name the field
    build_request(values, refs, spec, config, names) -> (ValidRequest, params)
        `fluxrt.request.validate` does every model check; `params` is what the store keeps (seed drawn here)
    job_json(job, progress, image_urls) -> dict   the job object of the native API
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..request import GenerationRequest, RequestError, validate
from .errors import ApiError, from_request_error
from .images import decode_upload

INT_RE = re.compile(r"[+-]?\d{1,19}")
FLOAT_RE = re.compile(r"[+-]?(\d{1,20}(\.\d{0,20})?|\.\d{1,20})([eE][+-]?\d{1,3})?")
SIZE_RE = re.compile(r"(\d{1,5})x(\d{1,5})")
IMAGE_FIELD_RE = re.compile(r"image(\[\d{0,3}\])?")
OPENAI_NAMES = {"num_images": "n", "width": "size", "height": "size"}  # native name -> OpenAI field

# native API form: POST /v1/jobs
JOB_FIELDS = {"prompt": "str", "negative": "str", "width": "int", "height": "int", "steps": "int",
              "guidance": "float", "seed": "int", "num_images": "int", "timeout": "float"}  # fmt: skip
# OpenAI edits form: POST /v1/images/edits (OpenAI's own fields are accepted; those we cannot honour are refused)
EDIT_FIELDS = {"prompt": "str", "negative": "str", "n": "int", "size": "str", "response_format": "str",
               "model": "str", "quality": "str", "user": "str", "output_format": "str", "background": "str",
               "input_fidelity": "str", "safety_identifier": "str", "output_compression": "int", "stream": "str",
               "seed": "int", "steps": "int", "guidance": "float", "timeout": "float"}  # fmt: skip


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class OpenAIGeneration(BaseModel):
    """POST /v1/images/generations. OpenAI's fields plus fluxrt's (seed, steps, guidance, negative, timeout)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "2" is not 2: a JSON type error names the field

    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt | None = None
    size: StrictStr | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: StrictStr | None = None
    quality: StrictStr | None = None
    style: StrictStr | None = None
    background: StrictStr | None = None
    moderation: StrictStr | None = None
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    output_compression: StrictInt | None = None
    partial_images: StrictInt | None = None
    stream: StrictBool | None = None
    seed: StrictInt | None = None
    steps: StrictInt | None = None
    guidance: float | None = None
    negative: StrictStr | None = None
    timeout: float | None = None


class TextEmbeddingsBody(BaseModel):
    """POST /v1/text/embeddings."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompts: list[StrictStr]


# ---------------------------------------------------------------------------------------------------- forms
async def read_form(request, fields: dict, limits) -> tuple[dict, list]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ApiError(415, f"content type {ctype!r} is not multipart/form-data or application/x-www-form-urlencoded")
    form = await request.form(max_files=limits.max_refs + 1, max_fields=limits.max_form_fields, max_part_size=1 << 20)
    values: dict[str, str] = {}
    raw_images: list[tuple[str, bytes]] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if not IMAGE_FIELD_RE.fullmatch(key):
                    raise ApiError(400, f"field {short_repr(key)} is a file; only image[] takes files", key[:40])
                raw_images.append((f"image[{len(raw_images)}]", await value.read(limits.max_file_bytes + 1)))
                continue
            if IMAGE_FIELD_RE.fullmatch(key):
                raise ApiError(400, f"{key} must be an image file, got text {short_repr(value)}", key)
            if key == "mask":
                raise ApiError(400, "mask is not supported: FLUX.2 edits follow the prompt and the references", key)
            if key not in fields:
                raise ApiError(400, f"unknown field {short_repr(key)}; known: {', '.join(sorted(fields))}, image[]",
                               key[:40])  # fmt: skip
            if key in values:
                raise ApiError(400, f"field {key} was given more than once", key)
            values[key] = value
    finally:
        await form.close()
    images = [await run_in_threadpool(decode_upload, data, name, limits) for name, data in raw_images]
    return values, images


def form_values(values: dict, kinds: dict) -> dict:
    """Text form values -> typed values; empty optional fields (a blank HTML input) count as absent."""
    out = {}
    for key, text in values.items():
        kind = kinds[key]
        if kind != "str" and text.strip() == "":
            continue
        if kind == "int":
            if not INT_RE.fullmatch(text.strip()):
                raise ApiError(400, f"{key} must be an integer, got {short_repr(text)}", key)
            out[key] = int(text)
        elif kind == "float":
            if not FLOAT_RE.fullmatch(text.strip()):
                raise ApiError(400, f"{key} must be a number, got {short_repr(text)}", key)
            out[key] = float(text)
        else:
            out[key] = text
    return out


# ----------------------------------------------------------------------------------------------- requests
def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's "WIDTHxHEIGHT" (or "auto" / None for the model's default size)."""
    if size is None or size == "auto":
        return None, None
    m = SIZE_RE.fullmatch(size)
    if not m:
        raise ApiError(400, f"size must be WIDTHxHEIGHT (e.g. 1024x1024) or auto, got {short_repr(size)}", "size")
    return int(m.group(1)), int(m.group(2))


def check_openai_options(v: dict) -> None:
    """OpenAI options we cannot honour are refused, not silently ignored."""
    if v.get("output_format") not in (None, "png"):
        raise ApiError(
            400, f"output_format {short_repr(v['output_format'])} is not supported: only png", "output_format"
        )
    if v.get("background") not in (None, "auto", "opaque"):
        raise ApiError(400, f"background {short_repr(v['background'])} is not supported: only auto or opaque",
                       "background")  # fmt: skip
    if v.get("stream") not in (None, False, "false"):
        raise ApiError(400, "stream is not supported here: use POST /v1/jobs and its event stream", "stream")
    if v.get("response_format") not in (None, "url", "b64_json"):
        raise ApiError(400, f"response_format {short_repr(v['response_format'])} is not url or b64_json",
                       "response_format")  # fmt: skip


def _timeout(value, config) -> float:
    if value is None:
        return float(config.job_timeout_s)
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= config.max_job_timeout_s):
        raise ApiError(400, f"timeout {short_repr(value)} is out of range (0, {config.max_job_timeout_s:g}] seconds",
                       "timeout")  # fmt: skip
    return float(value)


def build_request(v: dict, refs: list, spec, config, names: dict | None = None):
    """Typed values (native names: prompt, negative, width, height, steps, guidance, seed, num_images, timeout)
    -> (ValidRequest, params to store)."""
    if "prompt" not in v:
        raise ApiError(400, "prompt is required", "prompt")
    timeout = _timeout(v.get("timeout"), config)
    req = GenerationRequest(prompt=v["prompt"], negative=v.get("negative"), width=v.get("width"),
                            height=v.get("height"), steps=v.get("steps"), guidance=v.get("guidance"),
                            seed=v.get("seed"), num_images=v.get("num_images", 1), refs=refs)  # fmt: skip
    try:
        valid = validate(req, spec, config.limits.request)
    except RequestError as e:
        raise from_request_error(e, names) from None
    params = {"prompt": v["prompt"], "negative": v.get("negative"), "width": valid.width, "height": valid.height,
              "steps": valid.steps, "guidance": valid.guidance, "seed": valid.samples[0].seed,
              "num_images": len(valid.samples), "ref_sizes": [list(im.size) for im in valid.samples[0].refs],
              "timeout": timeout}  # fmt: skip
    return valid, params


# -------------------------------------------------------------------------------------------------- output
def job_json(job, progress, image_urls: list[str]) -> dict:
    """The native API's job object (see docs/SERVICE.md)."""
    p = job.params
    total = p["steps"]
    if job.status == "running" and progress is not None:
        step, total = progress[1], progress[2]
    else:
        step = total if job.status == "succeeded" else 0
    params = {k: p[k] for k in ("prompt", "width", "height", "steps", "guidance", "seed", "num_images", "timeout")}
    params["n_refs"] = len(p.get("ref_sizes", ()))
    if p.get("negative") is not None:
        params["negative"] = p["negative"]
    return {
        "id": job.id, "object": "job", "kind": job.kind, "status": job.status,
        "progress": {"step": step, "total": total}, "params": params, "error": job.error, "error_code": job.error_code,
        "images": image_urls if job.status == "succeeded" else [], "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
    }  # fmt: skip

"""The HTTP API: `create_app(config) -> FastAPI`. Routes parse input, call the job service, render JSON.

Routes (docs/SERVICE.md has the details and examples):
    GET  /                                  the web page (fluxrt/service/web/index.html), /static/* beside it
    GET  /healthz                           200 {"status": "ok", ...} once the model is ready, else 503
    GET  /metrics                           Prometheus text: queue depth, job latency, GPU memory, ...
    POST /v1/images/generations             OpenAI-compatible (JSON), waits for the job, b64_json or url
    POST /v1/images/edits                   OpenAI-compatible (multipart, image / image[] references)
    POST /v1/jobs                           native: multipart form -> 202 job; 429 + Retry-After when full
    GET  /v1/jobs?limit=N | /v1/jobs/{id}   newest first | one job
    GET  /v1/jobs/{id}/events[?preview=1]   server-sent events: progress ..., then done
    DELETE /v1/jobs/{id}                    cancel
    GET  /v1/files/{id}/{index}.png         a result (bearer token, or the signed URL in the job's images)
    POST /v1/text/embeddings, GET /v1/text/info   prompt embeddings (safetensors), the only routes with
                                            text_encoder_only
Auth: `Authorization: Bearer <token>` on /v1/* (and /metrics unless public_metrics) when tokens are configured.
Each caller sees only the jobs made with its token. Errors are {"error": {"message", "type", "param", "code"}}.
An `Idempotency-Key` header on the POST routes makes a retry safe: the same key and request give the first job.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..request import RequestError
from . import api
from .config import ServiceConfig
from .errors import ApiError, from_request_error
from .jobs import IdempotencyConflict, JobService, is_job_id
from .metrics import gpu_memory, process_memory
from .middleware import BodyLimit, SecurityHeaders
from .store import QueueFull

log = logging.getLogger(__name__)

FILE_NAME_RE = re.compile(r"(\d{1,3})\.png")
IDEM_KEY_RE = re.compile(r"[\x21-\x7e]{1,200}")
HEARTBEAT_S = 15.0  # an SSE comment line keeps proxies from closing an idle stream
POLL_S = 0.05


def web_dir() -> Path:
    return Path(str(files("fluxrt").joinpath("service", "web")))


def create_app(config: ServiceConfig) -> FastAPI:
    svc = JobService(config)

    @asynccontextmanager
    async def lifespan(app):
        svc.start()
        try:
            yield
        finally:
            await run_in_threadpool(svc.close)

    app = FastAPI(title="fluxrt", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = svc
    _error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    _common_routes(app, svc)
    _text_routes(app, svc)
    if not config.text_encoder_only:
        _page_routes(app)
        _openai_routes(app, svc)
        _job_routes(app, svc)
    return app


# ------------------------------------------------------------------------------------------------ plumbing
def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        err = from_request_error(e)
        return JSONResponse(err.body(), err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r}"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid')} (got {api.short_repr(first.get('input'))})"
        return JSONResponse(ApiError(400, message, param).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), e.status_code, headers=e.headers)


def _owner(svc: JobService, request: Request) -> str:
    """The caller's owner id (a hash of its token; "" with auth off); 401 without a valid bearer token."""
    if not svc.config.auth:
        return ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token: send the header Authorization: Bearer <token>", None,
                       "missing_token", challenge)  # fmt: skip
    given = token.strip().encode("latin-1")
    match = None
    for t in svc.config.tokens:
        if hmac.compare_digest(given, t.encode()):
            match = t
    if match is None:
        raise ApiError(401, "invalid bearer token", None, "invalid_token", challenge)
    return hashlib.sha256(match.encode()).hexdigest()[:16]


def _auth(svc: JobService):
    """A dependency giving the caller's owner id; it runs before the body is validated (401 before 400)."""

    def owner(request: Request) -> str:
        return _owner(svc, request)

    return owner


def _job_or_404(svc: JobService, job_id: str, owner: str):
    job = svc.store.get(job_id, owner) if is_job_id(job_id) else None
    if job is None:
        raise ApiError(404, f"no job {api.short_repr(job_id)}", "id", "job_not_found")
    return job


def _image_urls(svc: JobService, job, base: str = "") -> list[str]:
    return [f"{base}/v1/files/{job.id}/{i}.png?{svc.sign(job.id, i)}" for i in range(job.n_images)]


def _render(svc: JobService, job) -> dict:
    return api.job_json(job, svc.hub.progress(job.id), _image_urls(svc, job) if job.status == "succeeded" else [])


def _ready(svc: JobService) -> None:
    if svc.state == "error":
        raise ApiError(503, f"the model failed to load: {svc.worker.error}", None, "model_unavailable")


def _idempotency(request: Request, values: dict, valid) -> tuple[str, str] | None:
    """(Idempotency-Key header, fingerprint of the request's values and reference pixels), or None without one."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not IDEM_KEY_RE.fullmatch(key):
        raise ApiError(400, f"Idempotency-Key {api.short_repr(key)} must be 1-200 printable ASCII characters",
                       "Idempotency-Key")  # fmt: skip
    canon = json.dumps({"route": request.url.path, "values": values, "refs": list(valid.ref_hashes[0])},
                       sort_keys=True, default=str)  # fmt: skip
    return key, hashlib.sha256(canon.encode()).hexdigest()


def _submit(svc: JobService, valid, params, owner: str, kind: str, idem=None):
    """(job, replayed); 429 + Retry-After when the queue is full, 409 for a reused Idempotency-Key."""
    try:
        return svc.submit(valid, params, owner, kind, idem)
    except QueueFull as e:
        wait = svc.retry_after()
        message = f"the queue is full ({e.args[0]} unfinished jobs, the limit is {svc.config.queue_size}); retry after"
        raise ApiError(429, f"{message} {wait} s", None, "queue_full", {"Retry-After": str(wait)}) from None
    except IdempotencyConflict as e:
        raise ApiError(409, f"Idempotency-Key {api.short_repr(e.args[0])} was used for a different request",
                       "Idempotency-Key", "idempotency_conflict") from None  # fmt: skip


# -------------------------------------------------------------------------------------------- common routes
def _common_routes(app: FastAPI, svc: JobService) -> None:
    @app.get("/healthz")
    def healthz():
        body = {"status": "ok" if svc.state == "ready" else svc.state, "model": svc.spec.name, "version": __version__,
                "uptime_s": round(time.time() - svc.started_at, 3)}  # fmt: skip
        if svc.store is not None:
            c = svc.store.counts()
            body["queue"] = {"queued": c["queued"], "running": c["running"], "capacity": svc.config.queue_size}
        if svc.state == "error":
            body["error"] = svc.worker.error
        return JSONResponse(body, 200 if svc.state == "ready" else 503)

    @app.get("/metrics")
    def metrics(request: Request):
        if not svc.config.public_metrics:
            _owner(svc, request)
        gauges = [("fluxrt_model_ready", "1 once the model is loaded.", float(svc.state == "ready"), None)]
        if svc.store is not None:
            c = svc.store.counts()
            gauges += [
                ("fluxrt_queue_depth", "Jobs waiting to run.", c["queued"], None),
                ("fluxrt_jobs_running", "Jobs running on the model.", c["running"], None),
                ("fluxrt_queue_capacity", "Unfinished jobs accepted before 429.", svc.config.queue_size, None),
            ]
            gauges += [("fluxrt_jobs", "Jobs in the store, by status.", n, {"status": s}) for s, n in c.items()]
        text = svc.metrics.render(gauges + gpu_memory() + process_memory())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _page_routes(app: FastAPI) -> None:
    root = web_dir()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        page = root / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html; charset=utf-8")
        return HTMLResponse("<!doctype html><title>fluxrt</title><p>fluxrt is running; the web page is not "
                            "installed. The API is described at <a href='/openapi.json'>/openapi.json</a>.")  # fmt: skip

    if root.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=root), name="static")


# -------------------------------------------------------------------------------------------- OpenAI routes
async def _wait(svc: JobService, job_id: str):
    """The job once it has finished (polls the in-memory hub; the store is read once at the end)."""
    checks = 0
    while not svc.hub.is_done(job_id):
        await asyncio.sleep(POLL_S)
        checks += 1
        if checks % 40 == 0 and svc.store.get(job_id).done:  # finished by a previous process, say
            break
    return svc.store.get(job_id)


def _openai_result(svc: JobService, job, request: Request, response_format: str | None) -> JSONResponse:
    if job.status == "failed":
        status = {"content_policy_violation": 400, "timeout": 504}.get(job.error_code or "", 500)
        raise ApiError(status, job.error or "the job failed", None, job.error_code)
    if job.status == "cancelled":
        raise ApiError(409, job.error or "the job was cancelled", None, "cancelled")
    if response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [{"url": u} for u in _image_urls(svc, job, base)]
    else:
        data = [{"b64_json": base64.b64encode(svc.result_path(job.id, i).read_bytes()).decode("ascii")}
                for i in range(job.n_images)]  # fmt: skip
    p = job.params
    return JSONResponse({"created": int(job.created_at), "data": data, "output_format": "png",
                         "size": f"{p['width']}x{p['height']}", "id": job.id})  # fmt: skip


def _openai_values(v: dict) -> dict:
    """OpenAI names -> native names (n -> num_images, size -> width/height)."""
    api.check_openai_options(v)
    w, h = api.parse_size(v.get("size"))
    out = {k: v[k] for k in ("prompt", "negative", "seed", "steps", "guidance", "timeout") if v.get(k) is not None}
    if v.get("n") is not None:
        out["num_images"] = v["n"]
    if w is not None:
        out["width"], out["height"] = w, h
    return out


def _openai_routes(app: FastAPI, svc: JobService) -> None:
    @app.post("/v1/images/generations")
    async def generations(body: api.OpenAIGeneration, request: Request, owner: str = Depends(_auth(svc))):
        _ready(svc)
        v = body.model_dump(exclude_none=True)
        valid, params = api.build_request(_openai_values(v), [], svc.spec, svc.config, api.OPENAI_NAMES)
        idem = _idempotency(request, v, valid)
        job, _ = await run_in_threadpool(_submit, svc, valid, params, owner, "openai", idem)
        return _openai_result(svc, await _wait(svc, job.id), request, v.get("response_format"))

    @app.post("/v1/images/edits", openapi_extra=_form_schema(api.EDIT_FIELDS, required=("prompt", "image[]")))
    async def edits(request: Request):
        owner = _owner(svc, request)
        _ready(svc)
        values, images = await api.read_form(request, api.EDIT_FIELDS, svc.config.limits)
        v = api.form_values(values, api.EDIT_FIELDS)
        if not images:
            raise ApiError(400, "image is required: send one or more reference images as image[]", "image[]")
        valid, params = api.build_request(_openai_values(v), images, svc.spec, svc.config, api.OPENAI_NAMES)
        idem = _idempotency(request, v, valid)
        job, _ = await run_in_threadpool(_submit, svc, valid, params, owner, "openai", idem)
        return _openai_result(svc, await _wait(svc, job.id), request, v.get("response_format"))


def _form_schema(fields: dict, required=("prompt",)) -> dict:
    """An OpenAPI requestBody for a multipart form parsed by hand (so /openapi.json describes it)."""
    types = {"str": {"type": "string"}, "int": {"type": "integer"}, "float": {"type": "number"}}
    props = {k: types[t] for k, t in fields.items()}
    props["image[]"] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    schema = {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


# ---------------------------------------------------------------------------------------------- job routes
def _job_routes(app: FastAPI, svc: JobService) -> None:
    @app.post("/v1/jobs", status_code=202, openapi_extra=_form_schema(api.JOB_FIELDS))
    async def submit_job(request: Request):
        owner = _owner(svc, request)
        values, images = await api.read_form(request, api.JOB_FIELDS, svc.config.limits)
        v = api.form_values(values, api.JOB_FIELDS)
        valid, params = api.build_request(v, images, svc.spec, svc.config)
        idem = _idempotency(request, v, valid)
        job, replayed = await run_in_threadpool(_submit, svc, valid, params, owner, "job", idem)
        headers = {"Location": f"/v1/jobs/{job.id}", **({"Idempotent-Replayed": "true"} if replayed else {})}
        return JSONResponse(_render(svc, job), 202, headers=headers)

    @app.get("/v1/jobs")
    def list_jobs(request: Request, limit: int = 50):
        owner = _owner(svc, request)
        if not 1 <= limit <= 500:
            raise ApiError(400, f"limit {limit} is out of range 1..500", "limit")
        return {"jobs": [_render(svc, j) for j in svc.store.list(owner, limit)]}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, request: Request):
        return _render(svc, _job_or_404(svc, job_id, _owner(svc, request)))

    @app.delete("/v1/jobs/{job_id}")
    def cancel_job(job_id: str, request: Request):
        owner = _owner(svc, request)
        _job_or_404(svc, job_id, owner)
        job = svc.store.cancel(job_id, owner)  # queued: cancelled now; running: cancel_requested
        if job.status == "running":
            svc.hub.cancel(job_id)  # the worker sees it after the next step
        elif job.status == "cancelled" and not svc.hub.is_done(job_id):
            svc.hub.mark_done(job_id)  # wakes event streams and waiting requests
        return _render(svc, job)

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, request: Request, preview: int = 0):
        job = _job_or_404(svc, job_id, _owner(svc, request))
        want = bool(preview) and svc.config.previews
        return StreamingResponse(_event_stream(svc, job, want), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    @app.get("/v1/files/{job_id}/{name}")
    def result_file(job_id: str, name: str, request: Request, exp: str = "", sig: str = ""):
        m = FILE_NAME_RE.fullmatch(name)
        if not is_job_id(job_id) or m is None:
            raise ApiError(404, f"no file {api.short_repr(job_id)}/{api.short_repr(name)}", None, "file_not_found")
        index = int(m.group(1))
        if exp or sig:
            if not svc.check_signature(job_id, index, exp, sig):
                raise ApiError(403, "the signed URL is invalid or has expired: get a fresh one from the job", None,
                               "bad_signature")  # fmt: skip
            job = svc.store.get(job_id)
        else:
            job = svc.store.get(job_id, _owner(svc, request))
        if job is None or job.status != "succeeded" or index >= job.n_images:
            raise ApiError(404, f"no file {job_id}/{index}.png", None, "file_not_found")
        return FileResponse(svc.result_path(job_id, index), media_type="image/png",
                            headers={"Cache-Control": "private, max-age=86400, immutable"})  # fmt: skip


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _event_stream(svc: JobService, job, want_preview: bool):
    """progress events whenever the step changes, then one done event with the job (module docstring)."""
    job_id, last, beat, checked = job.id, None, time.monotonic(), time.monotonic()
    if want_preview:
        svc.hub.want_preview(job_id, 1)
    try:
        if not job.done:
            last = 0
            yield _sse("progress", {"step": 0, "total": job.params["steps"], "status": job.status})
        while not job.done:
            p = svc.hub.progress(job_id)
            if p is not None and p[1] != last:
                last = p[1]
                data = {"step": p[1], "total": p[2], "status": "running"}
                if want_preview and p[3]:
                    data["preview"] = p[3]
                yield _sse("progress", data)
            now = time.monotonic()
            if svc.hub.is_done(job_id) or now - checked > 1.0:
                checked = now
                job = await run_in_threadpool(svc.store.get, job_id)
                if job.done:
                    break
            if now - beat > HEARTBEAT_S:
                beat = now
                yield ": keep-alive\n\n"
            await asyncio.sleep(POLL_S)
        yield _sse("done", _render(svc, job))
    finally:
        if want_preview:
            svc.hub.want_preview(job_id, -1)


# --------------------------------------------------------------------------------------------- text routes
def _text_routes(app: FastAPI, svc: JobService) -> None:
    from .remote import encode_embeddings, text_info

    def encoder():
        """(text encoder, its encode function, the lock to hold while it runs)."""
        if svc.text_encoder is not None:
            return svc.text_encoder, svc.text_encoder.encode, svc.text_lock
        _ready(svc)
        if svc.state != "ready":
            raise ApiError(503, "the model is still loading", None, "model_loading", {"Retry-After": "5"})
        pipe = svc.worker.pipe  # encode_prompts moves a parked (offloaded) encoder to its device and back
        return pipe.text_encoder, pipe.encode_prompts, svc.worker.model_lock

    @app.get("/v1/text/info")
    def info(request: Request):
        _owner(svc, request)
        return text_info(svc.spec, encoder()[0])

    @app.post("/v1/text/embeddings")
    def embeddings(body: api.TextEmbeddingsBody, owner: str = Depends(_auth(svc))):
        limits = svc.config.limits
        if not 1 <= len(body.prompts) <= limits.max_prompts:
            raise ApiError(400, f"prompts has {len(body.prompts)} entries, the limit is 1..{limits.max_prompts}",
                           "prompts")  # fmt: skip
        for i, p in enumerate(body.prompts):
            if len(p) > limits.request.max_prompt_chars:
                raise ApiError(400, f"prompts[{i}] has {len(p)} characters, more than the limit "
                               f"{limits.request.max_prompt_chars}", f"prompts[{i}]")  # fmt: skip
        _, encode, lock = encoder()
        with lock:
            try:
                data, header = encode_embeddings(encode, body.prompts)
            except (ValueError, TypeError) as e:  # the tokenizer's word on a prompt it cannot take
                raise ApiError(400, f"prompts: {e}", "prompts") from None
        return Response(data, media_type="application/octet-stream", headers=header)

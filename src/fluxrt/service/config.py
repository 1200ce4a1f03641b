"""Service configuration: one dataclass for `create_app`, bearer tokens, and the limits a request may ask for.

Contract:
    ServiceConfig(data_dir, tokens=(), host="127.0.0.1", pipeline=None, loader=None, model=None, ...)
        Checked at construction: auth may be off (no tokens) only when `host` is a loopback address.
        Exactly one of `pipeline` (built, e.g. in tests), `loader` (called once in the worker thread) or neither
        (then `Pipeline.load(model, device=..., dtype=..., step_cache=...)` runs in the worker thread) provides
        the model.
    ServiceLimits   upload and request limits; `request` is the `fluxrt.request.Limits` every job is validated with.
    load_tokens(token_file=None, environ=os.environ) -> tuple[str, ...]
        tokens from a file (one per line, `#` comments) and from $FLUXRT_TOKENS (comma or space separated);
        each must be at least 16 characters.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..request import Limits

ENV_TOKENS = "FLUXRT_TOKENS"
MIN_TOKEN_CHARS = 16  # a guessable token is no auth; secrets.token_urlsafe(32) gives 43
TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces: what an HTTP header carries unchanged


@dataclass(frozen=True)
class ServiceLimits:
    """What one HTTP request may send or ask for."""

    max_body_bytes: int = 64 << 20  # a whole request (multipart with its images)
    max_file_bytes: int = 20 << 20  # one uploaded image file
    max_pixels: int = 4096 * 4096  # one uploaded image, read from its header before any pixel is decoded
    max_prompts: int = 64  # per text-embeddings request
    max_form_fields: int = 64
    request: Limits = field(default_factory=lambda: Limits(max_side=2048, max_images=8, max_steps=100))

    @property
    def max_refs(self) -> int:
        return self.request.max_refs


@dataclass(frozen=True)
class ServiceConfig:
    data_dir: Path
    tokens: tuple[str, ...] = ()
    host: str = "127.0.0.1"  # where the server listens: decides whether auth may be off
    pipeline: object | None = None  # a built fluxrt Pipeline
    loader: Callable[[], object] | None = None  # builds the Pipeline (in the worker thread)
    model: str | None = None  # what to load when neither pipeline nor loader is given (None: the embedded model)
    device: str | None = None
    dtype: object | None = None
    step_cache: float | None = None  # `fluxrt.accel.cache` threshold for the loaded model (lossy); None: off
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    queue_size: int = 16  # accepted, unfinished jobs (queued + running); beyond it: 429
    max_batch: int = 4  # images per batch of compatible jobs
    job_timeout_s: float = 600.0  # default run-time limit of a job
    max_job_timeout_s: float = 3600.0  # the most a request may ask for with `timeout`
    max_attempts: int = 3  # a job interrupted this many times (server killed while running it) fails
    previews: bool = True  # low-resolution latent previews in the event stream (?preview=1)
    safety: str = "default"  # "default" | "filters-off" (like `fluxrt generate --safety`)
    guard: object | None = None  # a built SafetyGuard (tests); None: the model's default policy
    text_encoder_only: bool = False  # serve /v1/text/embeddings only
    text_encoder: object | None = None  # a built text encoder for text_encoder_only (tests)
    public_metrics: bool = False  # serve /metrics without a token
    url_ttl_s: int = 3600  # lifetime of signed result URLs
    retry_after_s: int | None = None  # Retry-After of a 429; None: estimated from recent job times
    c2pa_cert: Path | None = None  # certificate chain (PEM) that signs a C2PA manifest into every result
    c2pa_key: Path | None = None  # its private key (PEM); both or neither

    def __post_init__(self):
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "tokens", tuple(self.tokens))
        for t in self.tokens:
            check_token(t)
        if (self.c2pa_cert is None) != (self.c2pa_key is None):
            raise ValueError(f"C2PA signing needs both a certificate and a key, got cert={self.c2pa_cert!r} "
                             f"key={self.c2pa_key!r}")  # fmt: skip
        for name in ("c2pa_cert", "c2pa_key"):
            f = getattr(self, name)
            if f is not None and not Path(f).is_file():
                raise ValueError(f"{name} {str(f)!r} is not a file")
        if not self.tokens and not is_loopback(self.host):
            raise ValueError(f"host {self.host!r} is not a loopback address: auth can be off only on localhost; "
                             f"give tokens (--token-file or ${ENV_TOKENS})")  # fmt: skip
        if self.queue_size < 1 or self.max_batch < 1 or self.max_attempts < 1:
            raise ValueError(f"queue_size {self.queue_size}, max_batch {self.max_batch} and max_attempts "
                             f"{self.max_attempts} must be at least 1")  # fmt: skip
        if not 0 < self.job_timeout_s <= self.max_job_timeout_s:
            raise ValueError(f"job_timeout_s {self.job_timeout_s} must be in (0, max_job_timeout_s "
                             f"{self.max_job_timeout_s}]")  # fmt: skip
        if self.safety not in ("default", "filters-off"):
            raise ValueError(f"safety {self.safety!r} is not one of default, filters-off")

    @property
    def auth(self) -> bool:
        return bool(self.tokens)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and the name localhost; anything else (0.0.0.0, a LAN address, a name) is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> str:
    if not isinstance(token, str) or not TOKEN_RE.match(token):
        raise ValueError("a token must be printable ASCII without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"a token has {len(token)} characters, fewer than {MIN_TOKEN_CHARS}: make one with "
                         f"python -c \"import secrets; print(secrets.token_urlsafe(32))\"")  # fmt: skip
    return token


def load_tokens(token_file: str | os.PathLike | None = None, environ: Mapping[str, str] = os.environ) -> tuple:
    """Tokens from `token_file` (one per line; blank lines and `#` comments skipped) and $FLUXRT_TOKENS."""
    tokens: list[str] = []
    if token_file is not None:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise ValueError(f"token file {str(token_file)!r} does not exist")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                tokens.append(check_token(line))
        if not tokens:
            raise ValueError(f"token file {str(token_file)!r} holds no token")
    tokens += [check_token(t) for t in re.split(r"[,\s]+", environ.get(ENV_TOKENS, "")) if t]
    return tuple(dict.fromkeys(tokens))

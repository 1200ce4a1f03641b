"""The service core behind the HTTP routes: data dir, store, worker, admission, signed result URLs.

Contract:
    JobService(config)      locks the data dir (one server per data dir: a second one fails naming the first's pid),
                            opens the store, re-queues jobs a dead process left running, builds the safety guard
                            and the worker (or, with text_encoder_only, loads the text encoder)
    .start() / .close()     start the worker thread / stop it, close the store, release the lock
    .submit(valid, params, owner, kind, idem=None) -> (Job, replayed)   writes the references, then commits the job
                            (QueueFull beyond queue_size unfinished jobs); the HTTP 202 / 200 is sent only after this
                            returns. `idem`: a client's Idempotency-Key and the request's fingerprint, so a retried
                            request gets its first job instead of a second one
    .sign(job_id, i) -> "exp=...&sig=..."  and  .check_signature(job_id, i, exp, sig) -> bool
Data dir layout: jobs.sqlite3 (+ WAL files), refs/<job id>/<k>.png, results/<job id>/<i>.png, secret.key (signs
result URLs), server.lock. Job ids are 32 random hex digits made here; every path is built from them and integers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from ..outputs import atomic_write
from ..request import ValidRequest
from .metrics import Metrics
from .store import Job, JobStore, QueueFull
from .worker import Hub, Paths, Worker

log = logging.getLogger(__name__)

JOB_ID_HEX = 32


class IdempotencyConflict(Exception):
    """An Idempotency-Key was used before for a different request."""


def new_job_id() -> str:
    return secrets.token_hex(JOB_ID_HEX // 2)


def is_job_id(text: str) -> bool:
    return isinstance(text, str) and len(text) == JOB_ID_HEX and all(c in "0123456789abcdef" for c in text)


class DataDirLock:
    """An exclusive flock on <data dir>/server.lock; the OS drops it when the process dies (kill -9 included)."""

    def __init__(self, data_dir: Path):
        self.path = data_dir / "server.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one server per data dir is then the user's job
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise RuntimeError(f"data dir {str(data_dir)!r} is in use by another fluxrt server (pid {other or '?'})"
                               ) from None  # fmt: skip
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _secret(data_dir: Path) -> bytes:
    """The data dir's URL-signing key (created once, 0600), so signed URLs survive restarts."""
    path = data_dir / "secret.key"
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        except FileExistsError:
            pass
    key = path.read_bytes()
    if len(key) < 32:
        raise RuntimeError(f"{path} holds {len(key)} bytes, expected 32: remove it to make a new one")
    return key


class JobService:
    def __init__(self, config):
        from ..safety import guard_for

        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics()
        self.hub = Hub()
        self.text_encoder = None
        self.store = self.worker = self._lock = None
        config.data_dir.mkdir(parents=True, exist_ok=True)
        if config.text_encoder_only:
            self.spec, self.text_encoder = self._load_text_encoder()
            self.text_lock = threading.Lock()
            return
        self._lock = DataDirLock(config.data_dir)
        try:
            self.paths = Paths(config.data_dir)
            self.secret = _secret(config.data_dir)
            self.store = JobStore(config.data_dir / "jobs.sqlite3")
            recovered = self.store.recover(config.max_attempts)
            if any(recovered.values()):
                log.warning("jobs left running by a stopped server: %s", recovered)
            self.spec = self._spec()
            self.guard = config.guard if config.guard is not None else guard_for(self.spec, config.safety)
            self.worker = Worker(config, self.store, self.hub, self.spec, self.guard, self.metrics, self.paths)
        except BaseException:
            self.close()
            raise
        self._admit = threading.Lock()

    def _spec(self):
        if self.config.pipeline is not None:
            return self.config.pipeline.spec
        from ..pipeline import resolve_model

        return resolve_model(self.config.model).spec

    def _load_text_encoder(self):
        if self.config.text_encoder is not None:
            return self._spec(), self.config.text_encoder
        if self.config.pipeline is not None:
            return self.config.pipeline.spec, self.config.pipeline.text_encoder
        from ..pipeline import load_text_encoder_only

        return load_text_encoder_only(self.config.model, device=self.config.device, dtype=self.config.dtype)

    # ----------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self.worker is not None:
            self.worker.start()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def state(self) -> str:
        if self.config.text_encoder_only:
            return "ready"
        return self.worker.state

    # ------------------------------------------------------------------------------------------ admission
    def submit(self, valid: ValidRequest, params: dict, owner: str, kind: str,
               idem: tuple[str, str] | None = None) -> tuple[Job, bool]:  # fmt: skip
        """(job, replayed): with `idem` = (Idempotency-Key, fingerprint), a repeated request gets the first job back
        (replayed True) and a different request under the same key raises IdempotencyConflict."""
        job = Job(new_job_id(), owner, kind, "queued", params, len(valid.samples), time.time())
        with self._admit:  # check, write the references, commit: no other submission in between
            if idem is not None:
                found = self.store.find_idempotent(owner, idem[0])
                if found is not None:
                    if found[1] != idem[1]:
                        raise IdempotencyConflict(idem[0])
                    return found[0], True
            if self.depth() >= self.config.queue_size:
                self.metrics.rejected("queue_full")
                raise QueueFull(self.depth())
            for k, im in enumerate(valid.samples[0].refs):
                atomic_write(self.paths.ref(job.id, k), lambda f, im=im: im.save(f, "PNG"), overwrite=True)
            try:
                self.store.add(job, self.config.queue_size, idem)
            except QueueFull:
                self.metrics.rejected("queue_full")
                raise
        self.worker.notify()
        return job, False

    def depth(self) -> int:
        c = self.store.counts()
        return c["queued"] + c["running"]

    def retry_after(self) -> int:
        if self.config.retry_after_s is not None:
            return int(self.config.retry_after_s)
        per_batch = self.metrics.mean_run_s()
        batches = max(1, self.depth() // max(1, self.config.max_batch))
        return int(min(600, max(1, round(per_batch * batches))))

    # ------------------------------------------------------------------------------------- signed URLs
    def _mac(self, job_id: str, i: int, exp: int) -> str:
        return hmac.new(self.secret, f"{job_id}/{i}/{exp}".encode(), hashlib.sha256).hexdigest()[:32]

    def sign(self, job_id: str, i: int) -> str:
        exp = int(time.time()) + int(self.config.url_ttl_s)
        return f"exp={exp}&sig={self._mac(job_id, i, exp)}"

    def check_signature(self, job_id: str, i: int, exp: str, sig: str) -> bool:
        if not (exp.isdigit() and len(exp) <= 12 and len(sig) == 32 and all(c in "0123456789abcdef" for c in sig)):
            return False
        if int(exp) < time.time():
            return False
        return hmac.compare_digest(self._mac(job_id, i, int(exp)), sig)

    def result_path(self, job_id: str, i: int) -> Path:
        return self.paths.result(job_id, i)

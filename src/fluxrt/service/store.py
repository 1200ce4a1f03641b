"""The job store: SQLite in WAL mode, the single source of truth for every accepted job.

Contract:
    JobStore(path)                 opens (creates) the database; synchronous=FULL, so a committed job survives a crash
    add(job, capacity, idem=None)  inserts a queued job in one transaction with the capacity check (QueueFull when
                                   `capacity` unfinished jobs exist); the caller acknowledges only after it returns
    find_idempotent(owner, key)    the job an earlier request with this Idempotency-Key made, and its fingerprint
    claim(max_images, key) -> [Job]  the oldest queued job plus later queued jobs with the same `key(job)`, up to
                                   `max_images` images, moved to running in one transaction (attempts + 1)
    finish(id, status, error=None, code=None, records=None) -> bool
                                   running -> succeeded | failed | cancelled, once: False if the job was not running
    requeue(ids)                   running -> queued for a batch stopped by a graceful shutdown
    cancel(id, owner) -> Job | None   a queued job is cancelled at once; a running one gets cancel_requested
    recover(max_attempts) -> dict  at start-up: running jobs (the previous process died) go back to queued, or to
                                   cancelled (cancel was requested) or failed (interrupted max_attempts times)
    get / list / counts / log_decision / decisions

States: queued -> running -> succeeded | failed | cancelled; queued -> cancelled; running -> queued only by recover.
A job is never finished twice (finish() updates WHERE status = 'running'), so with one server per data dir (the
data-dir lock in `fluxrt.service.app`) nothing accepted is lost or completed twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TERMINAL = ("succeeded", "failed", "cancelled")
UNFINISHED = ("queued", "running")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    n_images INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    error_code TEXT,
    records TEXT,
    idem_key TEXT,
    idem_hash TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (owner, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    subject TEXT NOT NULL,
    allowed INTEGER NOT NULL,
    reason TEXT NOT NULL,
    flags TEXT NOT NULL,
    scores TEXT NOT NULL
);
"""


class QueueFull(Exception):
    """The store holds `capacity` unfinished jobs."""


@dataclass
class Job:
    id: str
    owner: str
    kind: str  # "job" (native API) | "openai"
    status: str
    params: dict
    n_images: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    cancel_requested: bool = False
    error: str | None = None
    error_code: str | None = None
    records: list = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


_COLUMNS = ("id", "owner", "kind", "status", "params", "n_images", "created_at", "started_at", "finished_at",
            "attempts", "cancel_requested", "error", "error_code", "records")  # fmt: skip


def _job(row) -> Job:
    d = dict(zip(_COLUMNS, row))
    d["params"] = json.loads(d["params"])
    d["records"] = json.loads(d["records"]) if d["records"] else []
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job(**d)


class JobStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # fsync at every commit: an acknowledged job is on disk
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Transaction(self._db, self._lock)

    # -------------------------------------------------------------------------------------------- writes
    def add(self, job: Job, capacity: int, idem: tuple[str, str] | None = None) -> None:
        """Insert a queued job; `idem` = (Idempotency-Key, request fingerprint), unique per owner."""
        key, digest = idem if idem is not None else (None, None)
        with self._tx() as db:
            (n,) = db.execute("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()
            if n >= capacity:
                raise QueueFull(n)
            cols = (*_COLUMNS, "idem_key", "idem_hash")
            db.execute(f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                       (job.id, job.owner, job.kind, "queued", json.dumps(job.params), job.n_images, job.created_at,
                        None, None, 0, 0, None, None, None, key, digest))  # fmt: skip

    def find_idempotent(self, owner: str, key: str) -> tuple[Job, str] | None:
        """(job, request fingerprint) submitted by `owner` with this Idempotency-Key, or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)}, idem_hash FROM jobs WHERE owner = ? AND "
                                   "idem_key = ?", (owner, key)).fetchone()  # fmt: skip
        return (_job(row[:-1]), row[-1]) if row else None

    def claim(self, max_images: int, key: Callable[[Job], object]) -> list[Job]:
        with self._tx() as db:
            rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE status = 'queued' ORDER BY seq").fetchall()
            if not rows:
                return []
            jobs = [_job(r) for r in rows]
            first, batch, n = jobs[0], [jobs[0]], jobs[0].n_images
            for j in jobs[1:]:
                if n + j.n_images <= max_images and key(j) == key(first):
                    batch.append(j)
                    n += j.n_images
            now = time.time()
            for j in batch:
                db.execute("UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1 WHERE id = ?",
                           (now, j.id))  # fmt: skip
                j.status, j.started_at, j.attempts = "running", now, j.attempts + 1
            return batch

    def finish(self, job_id: str, status: str, error: str | None = None, code: str | None = None,
               records: list | None = None) -> bool:  # fmt: skip
        if status not in TERMINAL:
            raise ValueError(f"finish: status {status!r} is not one of {', '.join(TERMINAL)}")
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET status = ?, finished_at = ?, error = ?, error_code = ?, records = ? "
                             "WHERE id = ? AND status = 'running'",
                             (status, time.time(), error, code, json.dumps(records or []), job_id))  # fmt: skip
            return cur.rowcount == 1

    def cancel(self, job_id: str, owner: str | None) -> Job | None:
        with self._tx() as db:
            job = self._get(db, job_id, owner)
            if job is None or job.done:
                return job
            if job.status == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?, error = ? WHERE id = ?",
                           (time.time(), "cancelled before it started", job_id))  # fmt: skip
            else:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self._get(db, job_id, owner)

    def recover(self, max_attempts: int) -> dict[str, int]:
        """Jobs left running by a dead process: back to queued, or cancelled / failed (module docstring)."""
        counts = {"requeued": 0, "cancelled": 0, "failed": 0}
        with self._tx() as db:
            now = time.time()
            counts["cancelled"] = db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, error = 'cancelled while the server stopped' "
                "WHERE status = 'running' AND cancel_requested = 1", (now,)).rowcount  # fmt: skip
            counts["failed"] = db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error_code = 'interrupted', error = "
                "'the server stopped while running this job ' || attempts || ' times' "
                "WHERE status = 'running' AND attempts >= ?", (now, max_attempts)).rowcount  # fmt: skip
            counts["requeued"] = db.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL WHERE status = 'running'"
            ).rowcount
        return counts

    def requeue(self, job_ids: list[str]) -> None:
        """Running jobs of a batch stopped by a shutdown go back to the queue; the attempt does not count."""
        with self._tx() as db:
            for job_id in job_ids:
                db.execute("UPDATE jobs SET status = 'queued', started_at = NULL, attempts = attempts - 1 "
                           "WHERE id = ? AND status = 'running'", (job_id,))  # fmt: skip

    def log_decision(self, job_id: str, subject: str, allowed: bool, reason: str, flags, scores) -> None:
        """One safety decision (never the image or the prompt text)."""
        with self._tx() as db:
            db.execute("INSERT INTO decisions (job_id, at, subject, allowed, reason, flags, scores) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (job_id, time.time(), subject, int(allowed), reason, json.dumps(list(flags)),
                        json.dumps({k: float(v) for k, v in dict(scores).items()})))  # fmt: skip

    # --------------------------------------------------------------------------------------------- reads
    def _get(self, db, job_id: str, owner: str | None) -> Job | None:
        row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        job = _job(row) if row else None
        return job if job is not None and (owner is None or job.owner == owner) else None

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or None when there is none or it belongs to another owner (None: any owner)."""
        with self._lock:
            return self._get(self._db, job_id, owner)

    def list(self, owner: str | None, limit: int) -> list[Job]:
        """Newest first."""
        with self._lock:
            if owner is None:
                rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY seq DESC LIMIT ?",
                                        (limit,)).fetchall()  # fmt: skip
            else:
                rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE owner = ? ORDER BY seq DESC "
                                        "LIMIT ?", (owner, limit)).fetchall()  # fmt: skip
            return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
        return {s: 0 for s in (*UNFINISHED, *TERMINAL)} | dict(rows)

    def decisions(self, job_id: str | None = None) -> list[dict]:
        with self._lock:
            q = "SELECT job_id, at, subject, allowed, reason, flags, scores FROM decisions"
            rows = self._db.execute(q + " WHERE job_id = ? ORDER BY seq" if job_id else q + " ORDER BY seq",
                                    (job_id,) if job_id else ()).fetchall()  # fmt: skip
        keys = ("job_id", "at", "subject", "allowed", "reason", "flags", "scores")
        return [{**dict(zip(keys, r)), "allowed": bool(r[3]), "flags": json.loads(r[5]), "scores": json.loads(r[6])}
                for r in rows]  # fmt: skip


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) under the store's lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()

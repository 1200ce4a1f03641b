"""kill -9 of a `fluxrt serve` process while it runs a job; a new server on the same data dir finishes that job
(and the one queued behind it) exactly once and serves the result."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image
from service_fixtures import free_port


def _serve(data_dir, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fluxrt", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--device", "cpu", "--no-previews", "--max-steps", "20", "--log-level", "warning"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.25):
    """Poll `predicate` every `poll` s (fast polls slow the server's worker down: they share 2 cores and the GIL)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} while waiting for {what}")
        try:
            value = predicate()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _finished(url: str, job_id: str):
    job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


@pytest.mark.slow
def test_kill_9_during_a_job_then_restart_completes_it(tmp_path):
    data, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    form = {"prompt": "a big yellow triangle at the bottom on a black background", "width": "64", "height": "64",
            "steps": "20", "seed": "42"}  # fmt: skip
    with open(tmp_path / "server.log", "wb") as log:
        proc = _serve(data, port, log)
        try:
            _wait(lambda: httpx.get(f"{url}/healthz").status_code == 200, 120, "the first server", proc)
            first = httpx.post(f"{url}/v1/jobs", data=form).json()["id"]
            second = httpx.post(f"{url}/v1/jobs", data={**form, "steps": "2", "seed": "43"}).json()["id"]
            _wait(
                lambda: httpx.get(f"{url}/v1/jobs/{first}").json()["progress"]["step"] >= 1, 60, "progress", proc, 0.02
            )
        finally:
            _stop(proc, signal.SIGKILL)  # kill -9 while the first job runs

        proc = _serve(data, port, log)
        try:
            _wait(lambda: httpx.get(f"{url}/healthz").status_code == 200, 120, "the restarted server", proc)
            a = _wait(lambda: _finished(url, first), 120, "the interrupted job", proc)
            b = _wait(lambda: _finished(url, second), 60, "the queued job", proc)
            assert (a["status"], a["attempts"]) == ("succeeded", 2), a
            assert (b["status"], b["attempts"]) == ("succeeded", 1), b
            r = httpx.get(url + a["images"][0])
            assert r.status_code == 200
            im = Image.open(io.BytesIO(r.content))
            assert im.size == (64, 64) and json.loads(im.info["fluxrt"])["seed"] == 42
            jobs = httpx.get(f"{url}/v1/jobs").json()["jobs"]
            assert sorted(j["id"] for j in jobs) == sorted([first, second])  # each accepted job once, nothing else
            assert sorted(p.name for p in (data / "results").iterdir()) == sorted([first, second])
        finally:
            _stop(proc)

"""Helpers for the service tests (tests/test_service*.py): one embedded pipeline per process, app factories,
tiny images, a uvicorn server in a thread on a free localhost port, and polling helpers."""

from __future__ import annotations

import dataclasses
import functools
import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'fluxrt[serve]'")
pytest.importorskip("uvicorn")

from fluxrt.request import Limits
from fluxrt.service.app import create_app
from fluxrt.service.config import ServiceConfig, ServiceLimits

TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "other-token-0123456789abcdef"
# small everything: the embedded model makes a 64x64 image in 2 steps in ~0.1 s on 2 cores
SMALL = ServiceLimits(max_body_bytes=2 << 20, max_file_bytes=1 << 20, max_pixels=512 * 512,
                      request=Limits(max_side=128, max_steps=200, max_images=4, max_refs=3))  # fmt: skip


@functools.lru_cache(maxsize=1)
def shared_pipeline():
    from fluxrt.pipeline import Pipeline

    return Pipeline.load(device="cpu")


def make_config(tmp_path, **overrides) -> ServiceConfig:
    base = {"data_dir": tmp_path, "pipeline": shared_pipeline(), "limits": SMALL, "queue_size": 8, "max_batch": 4}
    return ServiceConfig(**{**base, **overrides})


def make_app(tmp_path, **overrides):
    return create_app(make_config(tmp_path, **overrides))


def png_bytes(size=(64, 64), color=(200, 30, 30), seed: int | None = None, fmt: str = "PNG") -> bytes:
    if seed is None:
        im = Image.new("RGB", size, color)
    else:
        im = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def wait_ready(client, timeout: float = 60.0, headers=None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.get("/healthz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"server not ready after {timeout} s: {client.get('/healthz').text}")


def wait_job(client, job_id: str, timeout: float = 60.0, headers=None, until=("succeeded", "failed", "cancelled")):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in until:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {until} after {timeout} s: {job}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` in a thread on 127.0.0.1:<free port>; stops (lifespan shutdown included) on exit."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", limit_concurrency=200))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise AssertionError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def replace_limits(**request_changes) -> ServiceLimits:
    return dataclasses.replace(SMALL, request=dataclasses.replace(SMALL.request, **request_changes))

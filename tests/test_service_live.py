"""The service behind a real uvicorn server on a free localhost port: the official `openai` client, a bounded load
test, and prompt embeddings served to `RemoteTextEncoder`, `Pipeline.load(text_encoder_url=...)` and
`fluxrt generate --text-encoder-url`."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import pytest
import torch
from PIL import Image
from service_fixtures import TOKEN, LiveServer, make_app, png_bytes, shared_pipeline

openai = pytest.importorskip("openai")


def _wait_ready(url: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if httpx.get(f"{url}/healthz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("server not ready")


def test_openai_client_generates_and_edits_with_two_references(tmp_path):
    with LiveServer(make_app(tmp_path, tokens=(TOKEN,))) as srv:
        _wait_ready(srv.url)
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
        res = client.images.generate(model="fluxrt-shapes", prompt="a red circle in the center on a white background",
                                     size="64x64", n=2, response_format="b64_json",
                                     extra_body={"steps": 2, "seed": 3})  # fmt: skip
        assert len(res.data) == 2
        imgs = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in res.data]
        assert [im.size for im in imgs] == [(64, 64), (64, 64)] and imgs[0].tobytes() != imgs[1].tobytes()
        assert '"seed": 3' in imgs[0].info["fluxrt"] and '"seed": 4' in imgs[1].info["fluxrt"]

        refs = [("a.png", png_bytes((64, 64), (220, 20, 20)), "image/png"),
                ("b.png", png_bytes((96, 64), seed=1), "image/png")]  # fmt: skip
        res = client.images.edit(image=refs, prompt="place the object from image 1 left of image 2", size="64x64",
                                 response_format="url", extra_body={"steps": 2, "seed": 5})  # fmt: skip
        assert len(res.data) == 1 and res.data[0].url.startswith(f"{srv.url}/v1/files/")
        r = httpx.get(res.data[0].url)  # the signed URL needs no token
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)
        import json

        record = json.loads(Image.open(io.BytesIO(r.content)).info["fluxrt"])
        assert [ref["size"] for ref in record["refs"]] == [[64, 64], [96, 64]]

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong-token-0123456789", max_retries=0).images.generate(
                prompt="x", size="64x64"
            )
        with pytest.raises(openai.BadRequestError, match="width 65 is not a multiple of 16"):
            client.images.generate(prompt="x", size="65x64")


def test_bounded_load_every_accepted_job_completes_once(tmp_path):
    """50 clients submit at once into a queue of 6: the rest get 429 + Retry-After; every accepted job finishes
    exactly once, with its image on disk; nothing unaccepted is stored."""
    n_clients = 50
    app = make_app(tmp_path, queue_size=6, max_batch=4)
    with LiveServer(app) as srv:
        _wait_ready(srv.url)
        barrier = threading.Barrier(n_clients)
        results: list = [None] * n_clients

        def client(i: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                barrier.wait()
                r = c.post("/v1/jobs", data={"prompt": "a small blue square", "width": "64", "height": "64",
                                              "steps": "4", "seed": str(i)})  # fmt: skip
                results[i] = (r.status_code, r.headers.get("retry-after"), r.json())

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        accepted = [body["id"] for code, _, body in results if code == 202]
        rejected = [(code, ra) for code, ra, _ in results if code != 202]
        assert accepted and rejected, results
        assert all(code == 429 and ra is not None and int(ra) >= 1 for code, ra in rejected), rejected
        svc = app.state.service
        end = time.monotonic() + 60
        while time.monotonic() < end and not all(svc.hub.is_done(i) for i in accepted):
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        jobs = {j.id: j for j in svc.store.list(None, 1000)}
        assert sorted(jobs) == sorted(accepted)  # nothing refused was stored
        assert all(jobs[i].status == "succeeded" and jobs[i].attempts == 1 for i in accepted)
        assert all(svc.hub.completions[i] == 1 for i in accepted)
        assert all((tmp_path / "results" / i / "0.png").is_file() for i in accepted)
        print(f"\nload test: {len(accepted)} accepted, {len(rejected)} got 429, all completed once in {elapsed:.1f} s")


def test_remote_text_encoder_matches_the_local_one(tmp_path):
    from fluxrt.service.remote import RemoteTextEncoder

    pipe = shared_pipeline()
    te_app = make_app(tmp_path / "te", tokens=(TOKEN,), text_encoder_only=True)
    prompts = ["a red circle in the center on a white background", "a tiny pink circle on the right"]
    with LiveServer(te_app) as srv:
        r = httpx.post(f"{srv.url}/v1/text/embeddings", json={"prompts": prompts}, headers={"Authorization":
                       f"Bearer {TOKEN}"})  # fmt: skip
        assert r.status_code == 200 and r.headers["x-fluxrt-dtype"] == "float32"
        assert httpx.post(f"{srv.url}/v1/text/embeddings", json={"prompts": prompts}).status_code == 401
        assert httpx.post(f"{srv.url}/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
        remote = RemoteTextEncoder(srv.url, token=TOKEN, expect=pipe.spec.text_encoder)
        got = remote.encode(prompts)
        want = pipe.text_encoder.encode(prompts)
        assert r.headers["x-fluxrt-shape"] == ",".join(map(str, want.shape))
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)

        with pytest.raises(RuntimeError, match="HTTP 400"):
            remote.encode([])
        import dataclasses

        with pytest.raises(ValueError, match="needs"):
            RemoteTextEncoder(srv.url, token=TOKEN, expect=dataclasses.replace(pipe.spec.text_encoder, max_length=9))

        # end to end: `fluxrt generate --text-encoder-url` loads no text encoder and makes the local pipeline's image
        from fluxrt.cli import main

        out = tmp_path / "remote.png"
        args = ["generate", prompts[0], "--seed", "7", "--steps", "3", "--size", "64x64", "--device", "cpu", "--quiet"]
        import os

        os.environ["FLUXRT_TOKEN"] = TOKEN
        try:
            assert main([*args, "--out", str(out), "--text-encoder-url", srv.url]) == 0
        finally:
            del os.environ["FLUXRT_TOKEN"]
    from fluxrt.request import GenerationRequest
    from fluxrt.safety import watermark

    [local] = pipe.run(GenerationRequest(prompts[0], seed=7, steps=3, width=64, height=64))
    assert Image.open(out).tobytes() == watermark.embed(local.image).tobytes()  # what the CLI saves locally

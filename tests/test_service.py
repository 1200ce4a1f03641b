"""The HTTP service in-process (FastAPI TestClient) with the embedded model: native jobs, events, cancellation,
timeouts, batching, restart recovery, auth, upload limits, validation errors and the safety policy."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_fixtures import (
    OTHER_TOKEN,
    SMALL,
    TOKEN,
    auth,
    make_app,
    png_bytes,
    shared_pipeline,
    wait_job,
    wait_ready,
)

from fluxrt.outputs import read_metadata
from fluxrt.service.config import ServiceConfig, load_tokens
from fluxrt.service.store import JobStore

JOB = {"prompt": "a red circle in the center on a white background", "width": "64", "height": "64", "steps": "2"}


def _events(client, job_id: str, preview: bool = False, headers=None) -> list[tuple[str, dict]]:
    out, event = [], None
    with client.stream("GET", f"/v1/jobs/{job_id}/events" + ("?preview=1" if preview else ""), headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
    return out


@pytest.fixture
def client(tmp_path):
    with TestClient(make_app(tmp_path)) as c:
        wait_ready(c)
        yield c


# ------------------------------------------------------------------------------------------------ jobs
def test_job_lifecycle_with_events_previews_and_result_file(client, tmp_path):
    r = client.post("/v1/jobs", data={**JOB, "seed": "11", "steps": "20"})  # long enough to attach to the stream
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and len(job["id"]) == 32 and r.headers["location"] == f"/v1/jobs/{job['id']}"
    events = _events(client, job["id"], preview=True)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and set(kinds[:-1]) == {"progress"}
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps == sorted(steps) and steps[-1] == 20 and all(d["total"] == 20 for e, d in events if e == "progress")
    previews = [d["preview"] for e, d in events if e == "progress" and "preview" in d]
    assert previews, "no preview in the event stream"
    head, b64 = previews[-1].split(",", 1)
    assert head == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (16, 16)  # 4x4 latent cells, upscaled 4x
    done = events[-1][1]
    assert done["status"] == "succeeded" and done["progress"] == {"step": 20, "total": 20} and len(done["images"]) == 1
    r = client.get(done["images"][0])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    path = tmp_path / "results" / job["id"] / "0.png"
    assert path.read_bytes() == r.content
    assert read_metadata(path)["seed"] == 11 and read_metadata(path)["prompt"] == JOB["prompt"]
    listed = client.get("/v1/jobs?limit=5").json()["jobs"]
    assert listed[0]["id"] == job["id"]


def test_preview_tracks_the_final_image(client):
    """After a batch has refined the latent->colour map, the last preview has the decoded image's colours."""
    import numpy as np

    first = client.post("/v1/jobs", data={**JOB, "seed": "20", "num_images": "4"}).json()
    wait_job(client, first["id"])  # the worker refines the preview map on these 4 outputs
    job = client.post("/v1/jobs", data={**JOB, "seed": "30", "steps": "20"}).json()
    previews = [d["preview"] for e, d in _events(client, job["id"], preview=True) if "preview" in d]
    prev = Image.open(io.BytesIO(base64.b64decode(previews[-1].split(",", 1)[1]))).convert("RGB")
    final = Image.open(io.BytesIO(client.get(wait_job(client, job["id"])["images"][0]).content)).convert("RGB")
    a = np.asarray(prev.resize((4, 4), Image.Resampling.BOX), dtype=float)
    b = np.asarray(final.resize((4, 4), Image.Resampling.BOX), dtype=float)
    assert np.abs(a - b).mean() < 30, np.abs(a - b).mean()  # of 255; an unfitted map is off by ~70


def test_cancel_queued_and_running_jobs(tmp_path):
    app = make_app(tmp_path)
    c = TestClient(app)  # no lifespan yet: the worker is not running, jobs stay queued
    queued = c.post("/v1/jobs", data=JOB).json()
    r = c.delete(f"/v1/jobs/{queued['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    with c:
        long = c.post("/v1/jobs", data={**JOB, "steps": "200"}).json()
        wait_job(c, long["id"], until=("running",))
        r = c.delete(f"/v1/jobs/{long['id']}")
        assert r.status_code == 200 and r.json()["cancel_requested"] is True
        job = wait_job(c, long["id"])
        assert job["status"] == "cancelled" and job["images"] == []
        assert job["progress"]["step"] < 200
        assert not (tmp_path / "results" / long["id"]).exists()
        assert c.get(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
        assert c.delete("/v1/jobs/" + "0" * 32).status_code == 404


def test_job_timeout_fails_the_job(client):
    job = client.post("/v1/jobs", data={**JOB, "steps": "200", "timeout": "0.3"}).json()
    done = wait_job(client, job["id"])
    assert done["status"] == "failed" and done["error_code"] == "timeout" and "0.3 s" in done["error"]
    assert client.post("/v1/jobs", data={**JOB, "timeout": "99999"}).json()["error"]["param"] == "timeout"


def test_compatible_jobs_run_as_one_batch_with_unbatched_results(tmp_path):
    app = make_app(tmp_path)
    c = TestClient(app)
    ids = [c.post("/v1/jobs", data={**JOB, "seed": str(s)}).json()["id"] for s in (1, 2, 3)]
    odd = c.post("/v1/jobs", data={**JOB, "width": "128", "seed": "4"}).json()["id"]  # another size: own batch
    with c:
        jobs = [wait_job(c, i) for i in (*ids, odd)]
        assert [j["status"] for j in jobs] == ["succeeded"] * 4
        metrics = c.get("/metrics").text
        assert "fluxrt_batches_total 2" in metrics and "fluxrt_batch_images_total 4" in metrics
        batched = c.get(jobs[1]["images"][0]).content
        alone = wait_job(c, c.post("/v1/jobs", data={**JOB, "seed": "2"}).json()["id"])
        a = np.asarray(Image.open(io.BytesIO(c.get(alone["images"][0]).content)), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(batched)), dtype=np.int16)
        # The same image: CPU matmuls of a batch of 3 and of 1 may round differently, so up to one level apart.
        assert a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def test_restart_requeues_interrupted_and_queued_jobs(tmp_path):
    c = TestClient(make_app(tmp_path))  # no worker: nothing runs
    a = c.post("/v1/jobs", data={**JOB, "seed": "1"}).json()["id"]
    b = c.post("/v1/jobs", data={**JOB, "seed": "2"}).json()["id"]
    svc = c.app.state.service
    claimed = svc.store.claim(1, lambda j: 0)  # as if the server died while running job a
    assert [j.id for j in claimed] == [a]
    svc.close()
    with TestClient(make_app(tmp_path)) as c2:
        ja, jb = wait_job(c2, a), wait_job(c2, b)
        assert ja["status"] == jb["status"] == "succeeded"
        assert ja["attempts"] == 2 and jb["attempts"] == 1
        assert c2.app.state.service.hub.completions[a] == 1


def test_one_server_per_data_dir(tmp_path):
    app = make_app(tmp_path)
    with pytest.raises(RuntimeError, match="in use by another fluxrt server"):
        make_app(tmp_path)
    app.state.service.close()
    make_app(tmp_path).state.service.close()  # released


def test_queue_full_gives_429_with_retry_after(tmp_path):
    c = TestClient(make_app(tmp_path, queue_size=2, retry_after_s=7))  # no worker: the queue only fills
    assert [c.post("/v1/jobs", data=JOB).status_code for _ in range(2)] == [202, 202]
    r = c.post("/v1/jobs", data=JOB)
    assert r.status_code == 429 and r.headers["retry-after"] == "7" and r.json()["error"]["code"] == "queue_full"
    assert len(c.get("/v1/jobs").json()["jobs"]) == 2  # the refused one left nothing behind
    c.app.state.service.close()


def test_idempotency_key_makes_retries_safe(tmp_path):
    c = TestClient(make_app(tmp_path))  # no worker: the jobs stay queued
    key = {"Idempotency-Key": "retry-me-1"}
    files = [("image[]", ("a.png", png_bytes(), "image/png"))]
    first = c.post("/v1/jobs", data=JOB, files=files, headers=key)
    again = c.post("/v1/jobs", data=JOB, files=files, headers=key)
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    other_ref = [("image[]", ("a.png", png_bytes(color=(0, 0, 255)), "image/png"))]
    r = c.post("/v1/jobs", data=JOB, files=other_ref, headers=key)
    assert r.status_code == 409 and r.json()["error"]["param"] == "Idempotency-Key"
    assert c.post("/v1/jobs", data=JOB, headers={"Idempotency-Key": "bad key"}).status_code == 400
    assert c.post("/v1/jobs", data=JOB).json()["id"] != first.json()["id"]
    assert len(c.get("/v1/jobs").json()["jobs"]) == 2
    c.app.state.service.close()


# ------------------------------------------------------------------------------------------------ auth
def test_bearer_auth_owners_and_signed_urls(tmp_path):
    with TestClient(make_app(tmp_path, tokens=(TOKEN, OTHER_TOKEN))) as c:
        wait_ready(c)
        assert c.get("/healthz").status_code == 200
        assert c.get("/").status_code == 200  # the page needs no token
        r = c.post("/v1/jobs", data=JOB)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/jobs", data=JOB, headers=auth("wrong-token-0123456789")).status_code == 401
        assert c.get("/metrics").status_code == 401 and c.get("/metrics", headers=auth()).status_code == 200
        job = c.post("/v1/jobs", data=JOB, headers=auth()).json()
        done = wait_job(c, job["id"], headers=auth())
        assert c.get(f"/v1/jobs/{job['id']}", headers=auth(OTHER_TOKEN)).status_code == 404
        assert c.get("/v1/jobs", headers=auth(OTHER_TOKEN)).json()["jobs"] == []
        assert c.delete(f"/v1/jobs/{job['id']}", headers=auth(OTHER_TOKEN)).status_code == 404
        url = done["images"][0]
        assert c.get(url).status_code == 200  # signed: an <img src> works without a token
        assert c.get(url.replace("sig=", "sig=0")).status_code == 403
        plain = url.split("?")[0]
        assert c.get(plain).status_code == 401
        assert c.get(plain, headers=auth()).status_code == 200
        assert c.get(plain, headers=auth(OTHER_TOKEN)).status_code == 404


def test_auth_off_only_on_loopback_and_token_loading(tmp_path, monkeypatch):
    for host in ("0.0.0.0", "192.168.1.5", "example.com"):
        with pytest.raises(ValueError, match="loopback"):
            ServiceConfig(data_dir=tmp_path, host=host)
    for host in ("127.0.0.1", "::1", "localhost", "127.1.2.3"):
        ServiceConfig(data_dir=tmp_path, host=host)
    ServiceConfig(data_dir=tmp_path, host="0.0.0.0", tokens=(TOKEN,))
    f = tmp_path / "tokens.txt"
    f.write_text(f"# comment\n{TOKEN}\n\n{OTHER_TOKEN}  # second\n")
    monkeypatch.setenv("FLUXRT_TOKENS", f"env-token-0123456789abcdef,{TOKEN}")
    assert load_tokens(f) == (TOKEN, OTHER_TOKEN, "env-token-0123456789abcdef")
    f.write_text("short\n")
    with pytest.raises(ValueError, match="fewer than 16"):
        load_tokens(f)


# ------------------------------------------------------------------------------------ validation, uploads
@pytest.mark.parametrize("form, param", [
    ({**JOB, "width": "65"}, "width"),
    ({**JOB, "steps": "two"}, "steps"),
    ({**JOB, "steps": "999"}, "steps"),
    ({**JOB, "guidance": "nan"}, "guidance"),
    ({**JOB, "seed": "-1"}, "seed"),
    ({**JOB, "num_images": "5"}, "num_images"),
    ({**JOB, "colour": "red"}, "colour"),
    ({k: v for k, v in JOB.items() if k != "prompt"}, "prompt"),
    ({**JOB, "prompt": "   "}, "prompt"),
    ({**JOB, "width": "4096"}, "width"),
])  # fmt: skip
def test_bad_form_fields_are_400_naming_the_field(tmp_path, form, param):
    c = TestClient(make_app(tmp_path))
    r = c.post("/v1/jobs", data=form)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    c.app.state.service.close()


def test_bad_json_is_400_naming_the_field(client):
    cases = [({"prompt": "x", "size": "65x64"}, "size"), ({"prompt": "x", "guidance": "4"}, "guidance"), ({"prompt": "x", "steps": "2"}, "steps"),
             ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "size": "big"}, "size"), ({"prompt": 3}, "prompt"),
             ({"prompt": "x", "response_format": "gif"}, "response_format"), ({"prompt": "x", "bogus": 1}, "bogus"),
             ({"prompt": "x", "output_format": "jpeg"}, "output_format"), ({"size": "64x64"}, "prompt")]  # fmt: skip
    for body, param in cases:
        r = client.post("/v1/images/generations", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 1, "guidance": 4})
    assert r.status_code == 200, r.text  # an integer is a number


def _png_header_bomb(w: int, h: int) -> bytes:
    """A valid PNG signature and IHDR claiming w x h, with a tiny IDAT: nothing to inflate unless decoded."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))  # fmt: skip


def _bomb_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, "PNG", optimize=True)  # zeros: ~1000x compression
    return buf.getvalue()


def test_uploads_are_checked(tmp_path):
    c = TestClient(make_app(tmp_path))

    def post(files, data=JOB):
        return c.post("/v1/jobs", data=data, files=files)

    ok = png_bytes()
    assert post([("image[]", ("a.png", ok, "image/png"))]).status_code == 202
    bomb = _png_header_bomb(100_000, 100_000)
    r = post([("image[]", ("a.png", ok, "image/png")), ("image[]", ("b.png", bomb, "image/png"))])
    assert r.status_code == 413 and r.json()["error"]["param"] == "image[1]" and "10000000000 pixels" in r.text
    real = _bomb_png(2048)  # 4 M pixels in a few kB; the limit is 512 x 512
    assert len(real) < 20_000
    r = post([("image[]", ("a.png", real, "image/png"))])
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, "GIF")
    r = post([("image[]", ("a.png", gif.getvalue(), "image/png"))])
    assert r.status_code == 415 and r.json()["error"]["param"] == "image[0]"
    assert post([("image[]", ("a.png", ok[:60], "image/png"))]).status_code == 400  # truncated
    assert post([("image[]", ("a.png", b"hello", "image/png"))]).status_code == 415
    assert post([("image[]", ("a.png", png_bytes((32, 32)), "image/png"))]).json()["error"]["param"] == "image[]"
    r = post([("image[]", (f"{i}.png", ok, "image/png")) for i in range(4)])  # max_refs 3
    assert r.status_code == 400 and r.json()["error"]["param"] == "image[]"
    r = post([("photo", ("a.png", ok, "image/png"))])
    assert r.status_code == 400 and r.json()["error"]["param"] == "photo"
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (SMALL.max_body_bytes + 10)
    r = post([("image[]", ("a.png", big, "image/png"))])
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    jpeg, webp = png_bytes(fmt="JPEG"), png_bytes(fmt="WEBP")
    assert post([("image", ("x", jpeg, "text/plain")), ("image", ("y", webp, "text/plain"))]).status_code == 202
    c.app.state.service.close()


def test_nothing_from_the_request_becomes_a_path(tmp_path):
    (tmp_path / "secret.txt").write_text("no")
    c = TestClient(make_app(tmp_path))
    r = c.post("/v1/jobs", data=JOB, files=[("image[]", ("../../secret.txt", png_bytes(), "image/png"))])
    job_id = r.json()["id"]
    assert sorted(p.name for p in (tmp_path / "refs" / job_id).iterdir()) == ["0.png"]
    for path in ("/v1/files/../secret.txt/0.png", f"/v1/files/{job_id}/..%2F..%2Fsecret.txt",
                 f"/v1/files/{job_id}/0.png.png", "/v1/files/ABC/0.png", f"/v1/jobs/{job_id[:-1]}x",
                 "/static/../jobs.sqlite3", "/v1/jobs/%2e%2e"):  # fmt: skip
        r = c.get(path)
        assert r.status_code in (401, 403, 404), (path, r.status_code)
    c.app.state.service.close()


# ------------------------------------------------------------------------------------------------ safety
class _FlagAll:
    threshold = 0.5

    def score(self, img):
        return 0.99


def _blocking_guard():
    from fluxrt.safety import SafetyGuard, SafetyPolicy

    policy = SafetyPolicy(nsfw=True, ip_check=False, watermark=False, c2pa=False)
    return SafetyGuard(policy, nsfw_checker=_FlagAll())


def test_flagged_outputs_are_neither_returned_nor_saved(tmp_path):
    with TestClient(make_app(tmp_path, guard=_blocking_guard())) as c:
        wait_ready(c)
        job = wait_job(c, c.post("/v1/jobs", data=JOB).json()["id"])
        assert job["status"] == "failed" and job["error_code"] == "content_policy_violation"
        assert "NSFW classifier score 0.990" in job["error"] and job["images"] == []
        assert not (tmp_path / "results" / job["id"]).exists()
        r = c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation"
        assert "data" not in r.json()
        log = c.app.state.service.store.decisions(job["id"])
        assert [(d["subject"], d["allowed"], d["flags"]) for d in log] == [("output 0", False, ["nsfw"])]
        assert "NSFW" in log[0]["reason"] and log[0]["scores"] == {"nsfw": pytest.approx(0.99)}
        assert "fluxrt_safety_blocked_total 2" in c.get("/metrics").text


class _FailsOnce:
    threshold = 0.5

    def __init__(self):
        self.calls = 0

    def score(self, img):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("classifier crashed")
        return 0.0


def test_a_failing_filter_fails_the_job_not_the_worker(tmp_path):
    from fluxrt.safety import SafetyGuard, SafetyPolicy

    guard = SafetyGuard(SafetyPolicy(nsfw=True, ip_check=False, watermark=False, c2pa=False), nsfw_checker=_FailsOnce())
    with TestClient(make_app(tmp_path, guard=guard)) as c:
        wait_ready(c)
        bad = wait_job(c, c.post("/v1/jobs", data=JOB).json()["id"])
        assert (
            bad["status"] == "failed" and bad["error_code"] == "server_error" and "classifier crashed" in bad["error"]
        )
        good = wait_job(c, c.post("/v1/jobs", data=JOB).json()["id"])
        assert good["status"] == "succeeded"
        assert not (tmp_path / "results" / bad["id"]).exists()


def test_default_policy_watermarks_and_logs_every_output(client):
    from fluxrt.safety import watermark

    job = wait_job(client, client.post("/v1/jobs", data={**JOB, "width": "128", "height": "128",
                                                         "num_images": "2"}).json()["id"])  # fmt: skip
    found, _ = watermark.detect(Image.open(io.BytesIO(client.get(job["images"][1]).content)).convert("RGB"))
    assert found
    log = client.app.state.service.store.decisions(job["id"])
    assert [(d["subject"], d["allowed"]) for d in log] == [("output 0", True), ("output 1", True)]


def test_metrics_and_health(client):
    wait_job(client, client.post("/v1/jobs", data=JOB).json()["id"])
    text = client.get("/metrics").text
    for name in ("fluxrt_queue_depth 0", "fluxrt_queue_capacity 8", 'fluxrt_jobs_finished_total{status="succeeded"} 1',
                 "fluxrt_job_latency_seconds_count 1", 'fluxrt_job_latency_seconds_bucket{le="+Inf"} 1',
                 "# TYPE fluxrt_job_run_seconds histogram", "process_resident_memory_bytes"):  # fmt: skip
        assert name in text, name
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["model"] == "fluxrt-shapes" and h["queue"]["capacity"] == 8


def test_store_finishes_a_job_once(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    from fluxrt.service.store import Job

    store.add(Job("a" * 32, "", "job", "queued", {"steps": 1}, 1, 0.0), capacity=4)
    [job] = store.claim(4, lambda j: 0)
    assert store.finish(job.id, "succeeded") is True
    assert store.finish(job.id, "failed", "late") is False
    assert store.get(job.id).status == "succeeded"
    assert store._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL: every commit is fsynced


def test_full_server_serves_prompt_embeddings_too(client):
    import torch
    from safetensors.torch import load

    info = client.get("/v1/text/info").json()
    assert info["spec"] == "fluxrt-shapes" and info["text_encoder"]["family"] == "qwen3"
    r = client.post("/v1/text/embeddings", json={"prompts": ["a red circle"]})
    assert r.status_code == 200
    assert torch.equal(load(r.content)["embeddings"], shared_pipeline().text_encoder.encode(["a red circle"]))
    assert client.post("/v1/text/embeddings", json={"prompts": ["x"] * 65}).json()["error"]["param"] == "prompts"
    assert client.post("/v1/text/embeddings", json={"prompts": [1]}).json()["error"]["param"] == "prompts.0"


def test_serve_command_refuses_an_open_host_without_tokens(tmp_path, monkeypatch, capsys):
    from fluxrt.cli import main

    monkeypatch.delenv("FLUXRT_TOKENS", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 2
    assert "auth can be off only on localhost" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("short\n")
    assert main(["serve", "--token-file", str(tmp_path / "t.txt"), "--data-dir", str(tmp_path)]) == 2


def test_c2pa_signed_results_verify_with_references_as_ingredients(tmp_path):
    from fluxrt.safety.provenance import make_test_ca, verify

    chain, key = make_test_ca(tmp_path / "ca")
    with TestClient(make_app(tmp_path / "data", c2pa_cert=chain, c2pa_key=key)) as c:
        wait_ready(c)
        files = [("image[]", ("a.png", png_bytes(), "image/png")), ("image[]", ("b.png", png_bytes(seed=1), "image/png"))]
        job = wait_job(c, c.post("/v1/jobs", data={**JOB, "prompt": "combine them"}, files=files).json()["id"])
        assert job["status"] == "succeeded", job
        data = c.get(job["images"][0]).content
    report = verify(data, tmp_path / "ca" / "ca.pem")
    assert report["valid"] and report["trusted"] and report["model"] == "fluxrt-shapes"
    assert len(report["ingredients"]) == 2


def test_c2pa_config_needs_both_files(tmp_path):
    with pytest.raises(ValueError, match="both a certificate and a key"):
        ServiceConfig(data_dir=tmp_path, c2pa_cert=tmp_path / "chain.pem")
    with pytest.raises(ValueError, match="is not a file"):
        ServiceConfig(data_dir=tmp_path, c2pa_cert=tmp_path / "chain.pem", c2pa_key=tmp_path / "k.pem")


def test_serve_cache_option_reaches_the_loaded_pipeline(tmp_path, monkeypatch):
    """`fluxrt serve --cache 0.2` loads the model with the step cache; a bad value is refused by the parser."""
    import argparse

    from fluxrt.cli import threshold_arg
    from fluxrt.service.cli import add_serve_parser, config_from_args
    from fluxrt.service.worker import Worker

    sub = argparse.ArgumentParser().add_subparsers()
    add_serve_parser(sub)
    parser = sub.choices["serve"]
    config = config_from_args(parser.parse_args(["--cache", "0.2", "--data-dir", str(tmp_path)]))
    assert config.step_cache == 0.2
    assert config_from_args(parser.parse_args(["--data-dir", str(tmp_path)])).step_cache is None
    with pytest.raises(argparse.ArgumentTypeError, match="'-1'"):
        threshold_arg("-1")
    pipe, seen = shared_pipeline(), {}

    def load(model, **kw):
        seen.update(kw)
        return pipe

    monkeypatch.setattr("fluxrt.pipeline.Pipeline.load", load)
    worker = Worker.__new__(Worker)
    worker.config, worker.pipe, worker.spec = config, None, pipe.spec
    worker._load()
    assert seen["step_cache"] == 0.2 and worker.pipe is pipe


def test_results_record_the_step_cache_and_its_skipped_steps(tmp_path):
    """A service whose model runs with the step cache (`fluxrt serve --cache`) says so in every result's record."""
    from fluxrt.pipeline import Pipeline

    pipe = Pipeline.load(device="cpu", step_cache=1e9)  # its own copy: the shared pipeline stays exact
    with TestClient(make_app(tmp_path, pipeline=pipe)) as c:
        wait_ready(c)
        job = wait_job(c, c.post("/v1/jobs", data={**JOB, "steps": "3"}).json()["id"])
    assert job["status"] == "succeeded", job
    record = read_metadata(tmp_path / "results" / job["id"] / "0.png")
    assert record["step_cache"] == 1e9 and record["step_cache_skipped"] == "2/3"

"""Fuzzed input (hypothesis) against every route never yields a 5xx; the OpenAPI schema describes the routes."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from service_fixtures import make_app, png_bytes, replace_limits, wait_ready

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# every valid request is 64x64 with at most 2 steps: fuzzing runs real jobs, fast
FUZZ_LIMITS = replace_limits(max_side=64, max_steps=2, max_images=2)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip

GEN_KEYS = ["prompt", "model", "n", "size", "response_format", "output_format", "quality", "style", "background",
            "user", "stream", "seed", "steps", "guidance", "negative", "timeout", "partial_images"]  # fmt: skip
FORM_KEYS = ["prompt", "negative", "width", "height", "steps", "guidance", "seed", "num_images", "timeout", "n",
             "size", "response_format", "mask", "model"]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["64x64", "auto", "url", "b64_json", "png", "a red circle"])
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6
)
random_bodies = st.dictionaries(st.sampled_from(GEN_KEYS) | st.text(max_size=8), json_values, max_size=6) | json_values
# near-valid bodies: mostly acceptable values, so fuzzing also reaches the model, the queue and the responses
prompts = st.text(min_size=1, max_size=40) | st.just("a red circle in the center on a white background")
near_valid_bodies = st.fixed_dictionaries(
    {"prompt": prompts, "size": st.sampled_from(["64x64", "64x64", "auto", "65x64", "0x0", "64x99999"]),
     "steps": st.integers(0, 3)},
    optional={"n": st.integers(-1, 3), "seed": st.integers(-5, 2**64), "guidance": st.floats(-1, 30),
              "response_format": st.sampled_from(["url", "b64_json", "gif"]), "negative": st.text(max_size=5),
              "timeout": st.floats(-1, 1e6) | st.just(30.0), "model": st.text(max_size=10),
              "quality": st.sampled_from(["low", "high"]), "user": st.text(max_size=10)})  # fmt: skip
json_bodies = near_valid_bodies | random_bodies

form_text = (st.text(max_size=10) | st.integers(-(2**64), 2**64).map(str) | st.floats().map(str)
             | st.sampled_from(["64", "2", "1", "0.5", "a red circle", "64x64", "", " "]))  # fmt: skip
file_bytes = st.binary(max_size=64) | st.sampled_from(
    [
        png_bytes(),
        png_bytes((32, 32)),
        png_bytes(fmt="JPEG"),
        b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
        b"RIFF\0\0\0\0WEBPVP8 ",
    ]
)
random_forms = st.dictionaries(st.sampled_from(FORM_KEYS) | st.text(max_size=8), form_text, max_size=7)
job_forms = st.fixed_dictionaries(
    {"prompt": prompts, "width": st.sampled_from(["64", "64", "63", "x", ""]), "height": st.just("64"),
     "steps": st.sampled_from(["1", "2", "3", "-1", "2.5"])},
    optional={"seed": form_text, "guidance": form_text, "num_images": st.sampled_from(["1", "2", "3"]),
              "timeout": form_text, "negative": form_text})  # fmt: skip
edit_forms = st.fixed_dictionaries(
    {"prompt": prompts, "size": st.sampled_from(["64x64", "64x64", "auto", "1x1"]), "steps": st.sampled_from(["1", "2"])},
    optional={"seed": form_text, "n": st.sampled_from(["1", "2", "9"]), "response_format": st.sampled_from(["url", "b64_json", "x"]),
              "timeout": form_text, "model": form_text})  # fmt: skip
routed_forms = st.tuples(st.just("/v1/jobs"), job_forms | random_forms) | st.tuples(
    st.just("/v1/images/edits"), edit_forms | random_forms
)
files = st.lists(st.tuples(st.sampled_from(["image[]", "image[]", "image", "image[7]", "mask", "x"]),
                           st.just(png_bytes()) | file_bytes), max_size=4)  # fmt: skip
SEEN: dict[str, set] = {"generations": set(), "forms": set()}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = make_app(tmp_path_factory.mktemp("fuzz"), limits=FUZZ_LIMITS, queue_size=64, previews=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def _ok(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]


@FUZZ
@given(body=json_bodies)
def test_fuzz_openai_generations(client, body):
    data = json.dumps(body).encode()  # NaN and Infinity included, as a careless client sends them
    r = client.post("/v1/images/generations", content=data, headers={"content-type": "application/json"})
    _ok(r)
    SEEN["generations"].add(r.status_code)


@FUZZ
@given(body=json_bodies)
def test_fuzz_text_embeddings(client, body):
    _ok(client.post("/v1/text/embeddings", content=json.dumps(body).encode(),
                    headers={"content-type": "application/json"}))  # fmt: skip


@FUZZ
@given(routed=routed_forms, uploads=files)
def test_fuzz_forms(client, routed, uploads):
    route, form = routed
    r = client.post(route, data=form, files=[(k, ("f.png", v, "image/png")) for k, v in uploads] or None)
    _ok(r)
    SEEN["forms"].add(r.status_code)


@FUZZ
@given(a=st.text(max_size=40), b=st.text(max_size=20), q=st.text(max_size=10))
def test_fuzz_paths_and_queries(client, a, b, q):
    a, b, q = quote(a, safe=""), quote(b, safe=""), quote(q, safe="")
    for method, path in (("GET", f"/v1/jobs/{a}"), ("DELETE", f"/v1/jobs/{a}"), ("GET", f"/v1/files/{a}/{b}"),
                         ("GET", f"/v1/files/{a}/{b}?exp={q}&sig={q}"), ("GET", f"/v1/jobs?limit={q}"),
                         ("GET", f"/v1/jobs/{a}/events?preview={q}"), ("GET", f"/static/{a}")):  # fmt: skip
        _ok(client.request(method, path))


def test_fuzzing_reached_accepted_and_refused_requests():
    """The near-valid strategies must get past validation (else the fuzz tests only exercise the 400 path)."""
    if not SEEN["generations"] or not SEEN["forms"]:
        pytest.skip("run with the fuzz tests above")
    assert 200 in SEEN["generations"] and 400 in SEEN["generations"], SEEN
    assert {200, 202} & SEEN["forms"] and 400 in SEEN["forms"], SEEN


def test_openapi_schema_lists_the_routes(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/jobs", "/v1/jobs/{job_id}",
                 "/v1/jobs/{job_id}/events", "/v1/files/{job_id}/{name}", "/v1/text/embeddings", "/healthz"):  # fmt: skip
        assert path in schema["paths"], path
    form = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"prompt", "width", "height", "steps", "guidance", "seed", "num_images", "image[]"} <= set(
        form["properties"]
    )

"""The pipeline on the embedded model (CPU, fp32, 64x64, 2 steps): loading, batching, prompt cache, run().

`embedded_pipeline()` loads the model once per test session; test_cli.py reuses it.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from fluxrt.config import SHAPES
from fluxrt.loading.errors import CheckpointError
from fluxrt.pipeline import EMBEDDED, Pipeline, Sample, batches, embedded_model_path, resolve_model
from fluxrt.request import GenerationRequest, RequestError

SIZE, STEPS, GUIDANCE = 64, 2, 4.0


@functools.lru_cache(maxsize=1)
def embedded_pipeline() -> Pipeline:
    return Pipeline.load(device="cpu")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return embedded_pipeline()


def shape(color: str, size=(96, 96), box=(16, 16, 64, 64)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    im.paste(Image.new("RGB", (box[2] - box[0], box[3] - box[1]), color), box[:2])
    return im


def test_load_embedded_defaults(pipe):
    assert pipe.spec.name == EMBEDDED and pipe.name == EMBEDDED
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu" and pipe.ae_device.type == "cpu"
    assert pipe.offload_text_encoder is False  # CPU only: nothing to offload
    assert (embedded_model_path() / "flow.safetensors").is_file()


def test_resolve_model_names_and_paths():
    assert resolve_model(None).spec is SHAPES
    assert resolve_model("FLUX.2-dev").spec.name == "flux.2-dev"  # preset names ignore case
    assert resolve_model("flux.2-dev").path is None  # files are looked up only when loading
    by_folder = resolve_model(str(embedded_model_path()))
    by_file = resolve_model(str(embedded_model_path() / "flow.safetensors"))
    assert by_folder.spec is SHAPES and by_file.spec is SHAPES  # detected from the headers
    assert resolve_model(str(embedded_model_path()), preset="fluxrt-shapes").spec is SHAPES
    with pytest.raises(RequestError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")
    with pytest.raises(RequestError, match="unknown preset 'flux.3'"):
        resolve_model(str(embedded_model_path()), preset="flux.3")
    with pytest.raises(RequestError, match="'tiny' contradicts model 'flux.2-dev'"):
        resolve_model("flux.2-dev", preset="tiny")


def test_preset_without_local_files_names_repo_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        Pipeline.load("flux.2-klein-4b", device="cpu")
    assert "black-forest-labs/FLUX.2-klein-4B" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(CheckpointError, match="'tiny' has no published weights"):
        Pipeline.load("tiny", device="cpu")
    with pytest.raises(RequestError, match="'nonsense:7'"):
        Pipeline.load(device="nonsense:7")


def test_batch_equals_samples_one_by_one(pipe):
    a, b, c = shape("red"), shape("blue", (128, 96)), shape("green", (96, 96), (0, 0, 48, 96))
    samples = [
        Sample("a red circle", 1), Sample("a blue square", 2, [a]), Sample("a green square", 3),
        Sample("make it blue", 4, [c]), Sample("combine them", 5, [a, b]), Sample("a red circle", 6, [a]),
    ]  # fmt: skip
    groups = batches(samples, 8)
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 3, 5], [4]]  # grouped by reference layout
    single = [pipe.denoise([s], SIZE, SIZE, STEPS, GUIDANCE) for s in samples]
    for idx in groups:
        batched = pipe.denoise([samples[i] for i in idx], SIZE, SIZE, STEPS, GUIDANCE)
        # fp32 CPU GEMMs block differently by batch size: summation-order noise (~1e-5 on O(1) latents); any
        # leak between samples or a misplaced reference moves latents by far more.
        torch.testing.assert_close(batched, torch.cat([single[i] for i in idx]), atol=1e-4, rtol=0)
    for i, im in enumerate(pipe.generate(samples, SIZE, SIZE, STEPS, GUIDANCE)):  # batched, back in input order
        alone = pipe.decode(single[i])[0]
        diff = np.abs(np.asarray(im, dtype=np.int16) - np.asarray(alone, dtype=np.int16)).max()
        assert im.size == (SIZE, SIZE) and diff <= 1, (i, diff)  # uint8 rounding of latents equal to 1e-4


def test_references_change_the_output(pipe):
    plain = pipe.generate([Sample("a red circle", 1)], SIZE, SIZE, STEPS, GUIDANCE)[0]
    edited = pipe.generate([Sample("a red circle", 1, [shape("blue")])], SIZE, SIZE, STEPS, GUIDANCE)[0]
    assert plain.tobytes() != edited.tobytes()


def test_prompt_cache_is_keyed_by_prompt_and_encoder(pipe, monkeypatch):
    calls = []
    real = pipe.text_encoder.encode
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda ps: calls.append(list(ps)) or real(ps))
    pipe._prompt_cache.clear()
    first = pipe.encode_prompts(["p one", "p two", "p one"])
    again = pipe.encode_prompts(["p two", "p one"])
    assert calls == [["p one", "p two"]]  # duplicates and repeats are never re-encoded
    assert torch.equal(first[0], first[2]) and torch.equal(again[1], first[0])
    assert all(key[1] == pipe.encoder_key for key in pipe._prompt_cache)
    monkeypatch.setattr(pipe.text_encoder, "system_message", "another system message")
    pipe.encode_prompts(["p one"])  # another encoder identity: encoded again, not served from the cache
    assert calls[-1] == ["p one"] and len(pipe._prompt_cache) == 3
    pipe.prompt_cache_size = 2
    pipe.encode_prompts(["p three"])
    assert len(pipe._prompt_cache) == 2


def test_run_validates_reports_progress_and_records(pipe):
    steps = []
    req = GenerationRequest(["a red circle", "a blue square"], width=SIZE, height=SIZE, steps=STEPS, seed=7,
                            refs=[[shape("red")], []], num_images=2)  # fmt: skip
    results = pipe.run(req, on_step=lambda done, total: steps.append((done, total)))
    assert [r.record["seed"] for r in results] == [7, 8, 9, 10]
    assert [r.record["prompt"] for r in results] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert len(results[0].record["refs"]) == 1 and results[2].record["refs"] == []
    assert steps == [(i, 2 * STEPS) for i in range(1, 2 * STEPS + 1)]  # two reference layouts = two batches
    assert results[0].record["dtype"] == "float32"
    with pytest.raises(RequestError, match="steps 0"):
        pipe.run(GenerationRequest("x", steps=0))


def test_offloaded_text_encoder_gives_the_same_features(pipe):
    other = Pipeline(pipe.spec, pipe.transformer, pipe.ae, pipe.text_encoder, offload_text_encoder=True,
                     text_encoder_device="cpu")  # fmt: skip
    torch.testing.assert_close(other.encode_prompts(["a red circle"]), pipe.encode_prompts(["a red circle"]))


def test_cfg_models_use_the_negative_prompt(pipe):
    from conftest import randomize_

    from fluxrt.config import replace
    from fluxrt.models.transformer import Flux2

    cfg = replace(SHAPES.transformer, use_guidance_embed=False, depth=1, depth_single_blocks=1)
    spec = replace(SHAPES, name="shapes-cfg", transformer=cfg, guidance_mode="cfg")
    cfg_pipe = Pipeline(spec, randomize_(Flux2(cfg), seed=1).eval(), pipe.ae, pipe.text_encoder)

    def latents(negative, guidance):
        return cfg_pipe.denoise([Sample("a red circle", 1, negative=negative)], SIZE, SIZE, STEPS, guidance)

    # u + s (c - u): at s = 1 the unconditional half (the negative prompt) cancels out, at s = 4 it does not
    torch.testing.assert_close(latents("", 1.0), latents("blurry", 1.0), atol=1e-5, rtol=0)
    assert (latents("", 4.0) - latents("blurry", 4.0)).abs().max() > 1e-3
    rec = cfg_pipe.run(GenerationRequest("a red circle", negative="blurry", width=SIZE, height=SIZE, steps=STEPS,
                                         seed=1))[0].record  # fmt: skip
    assert rec["negative"] == "blurry" and rec["spec"] == "shapes-cfg"

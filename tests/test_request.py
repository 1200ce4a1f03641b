"""Request validation: defaults per variant, batches of samples, references, and every error path.

No model is loaded: `validate` needs only the spec, so these run in milliseconds.
"""

from __future__ import annotations

import pytest
from PIL import Image

from fluxrt.config import PRESETS, SHAPES
from fluxrt.request import GenerationRequest, Limits, RequestError, image_sha256, validate

KLEIN = PRESETS["flux.2-klein-4b"]
KLEIN_BASE = PRESETS["flux.2-klein-base-4b"]
DEV = PRESETS["flux.2-dev"]


def img(w=96, h=96, color="red") -> Image.Image:
    return Image.new("RGB", (w, h), color)


def req(**kw) -> GenerationRequest:
    kw.setdefault("prompt", "a red circle")
    return GenerationRequest(**kw)


def test_defaults_come_from_the_spec():
    v = validate(req(seed=1), SHAPES)
    assert (v.width, v.height, v.steps, v.guidance) == (256, 256, 24, 4.0)
    assert v.model == "fluxrt-shapes" and v.output_format == "png"
    k = validate(req(seed=1), KLEIN)
    assert (k.width, k.height, k.steps, k.guidance) == (1024, 1024, 4, 1.0)


def test_seeds_prompts_and_images_expand_in_order():
    v = validate(req(prompt=["a", "b"], seed=10, num_images=2), SHAPES)
    assert [(s.prompt, s.seed) for s in v.samples] == [("a", 10), ("a", 11), ("b", 12), ("b", 13)]
    v = validate(req(prompt=["a", "b"], seed=[5, 3]), SHAPES)
    assert [s.seed for s in v.samples] == [5, 3]
    drawn = validate(req(num_images=3), SHAPES).samples
    assert 0 <= drawn[0].seed < 2**31 and [s.seed - drawn[0].seed for s in drawn] == [0, 1, 2]


def test_per_prompt_and_shared_references(tmp_path):
    a, b = img(96, 96, "red"), img(128, 64, "blue")
    b.save(tmp_path / "b.png")
    v = validate(req(prompt=["x", "y"], refs=[[a], [a, str(tmp_path / "b.png")]], seed=0), SHAPES)
    assert [len(s.refs) for s in v.samples] == [1, 2]
    assert v.ref_hashes[1] == (image_sha256(a), image_sha256(b))  # a file and the same pixels in memory agree
    shared = validate(req(prompt=["x", "y"], refs=[a], seed=0), SHAPES)
    assert shared.samples[0].refs is shared.samples[1].refs  # loaded once, encoded once
    rec = v.record(1)
    assert rec["refs"] == [{"sha256": image_sha256(a), "size": [96, 96]},
                           {"sha256": image_sha256(b), "size": [128, 64]}]  # fmt: skip
    assert {"model", "prompt", "seed", "steps", "guidance", "width", "height", "fluxrt_version"} <= set(rec)


def test_large_references_are_kept_for_the_pipeline_to_resize():
    v = validate(req(refs=[img(2100, 2100)], seed=0), SHAPES)  # over the 2024^2 cap: resized later, not rejected
    assert v.samples[0].refs[0].size == (2100, 2100)


def test_match_image_size_floors_the_reference_size():
    v = validate(req(refs=[img(96, 96), img(200, 130)], match_image_size=1, seed=0), SHAPES)
    assert (v.width, v.height) == (192, 128)


def test_output_format_aliases():
    assert validate(req(output_format="JPG", seed=0), SHAPES).output_format == "jpeg"


def test_negative_prompt_only_for_cfg_models():
    v = validate(req(negative="blurry", seed=0), KLEIN_BASE)
    assert v.samples[0].negative == "blurry" and v.record(0)["negative"] == "blurry"
    with pytest.raises(RequestError, match="'blurry'.*CFG"):
        validate(req(negative="blurry"), SHAPES)


def test_expected_reference_hashes():
    a = img()
    validate(req(refs=[a], expected_ref_hashes=[image_sha256(a)]), SHAPES)
    with pytest.raises(RequestError, match="refs\\[0\\] has sha256"):
        validate(req(refs=[img(color="blue")], expected_ref_hashes=[image_sha256(a)]), SHAPES)
    with pytest.raises(RequestError, match="0 reference images given.*made with 1"):
        validate(req(expected_ref_hashes=[image_sha256(a)]), SHAPES)


@pytest.mark.parametrize(
    "kw, spec, pieces",
    [
        (dict(width=100, height=64), SHAPES, ["width 100", "multiple of 16"]),
        (dict(width=64, height=72), SHAPES, ["height 72", "multiple of 16"]),
        (dict(width=48, height=64), SHAPES, ["width 48", "64..4096"]),
        (dict(width=8192, height=1024), SHAPES, ["width 8192", "64..4096"]),
        (dict(width=1024, height=64), SHAPES, ["1024x64", "aspect ratio 16", "8"]),
        (dict(width="64", height=64), SHAPES, ["width", "'64'"]),
        (dict(refs=[img()] * 11), SHAPES, ["11 reference images", "limit 10"]),
        (dict(refs=[img(32, 32)]), SHAPES, ["refs[0]", "32x32", "64 px"]),
        (dict(refs=[img(96, 96), img(900, 100)]), SHAPES, ["refs[1]", "900x100", "aspect ratio 9"]),
        (dict(refs=["/no/such/ref.png"]), SHAPES, ["/no/such/ref.png"]),
        (dict(refs=[42]), SHAPES, ["refs must be", "[42]"]),
        (dict(seed=-1), SHAPES, ["seed -1", "0..9223372036854775807"]),
        (dict(seed=2**63), SHAPES, ["seed 9223372036854775808"]),
        (dict(seed=[1, 2]), SHAPES, ["2 seeds for 1 images"]),
        (dict(seed=1.5), SHAPES, ["seed", "1.5"]),
        (dict(steps=0), SHAPES, ["steps 0", "1..200"]),
        (dict(steps=201), SHAPES, ["steps 201", "1..200"]),
        (dict(steps=8), KLEIN, ["steps 8", "flux.2-klein-4b", "exactly 4"]),
        (dict(guidance=3.5), KLEIN, ["guidance 3.5", "1 only"]),
        (dict(guidance=20.5), SHAPES, ["guidance 20.5", "0..20"]),
        (dict(guidance=-1), SHAPES, ["guidance -1", "0..20"]),
        (dict(guidance=float("nan")), SHAPES, ["guidance", "nan"]),
        (dict(prompt=""), SHAPES, ["prompt is empty", "''"]),
        (dict(prompt="   "), SHAPES, ["prompt is empty", "'   '"]),
        (dict(prompt=[]), SHAPES, ["no prompt"]),
        (dict(prompt="x" * 10_001), SHAPES, ["10001 characters", "10000"]),
        (dict(prompt=["ok", ""]), SHAPES, ["prompt[1] is empty"]),
        (dict(num_images=0), SHAPES, ["num_images 0", "1..16"]),
        (dict(num_images=17), SHAPES, ["num_images 17", "1..16"]),
        (dict(prompt=["a", "b", "c"], num_images=6), SHAPES, ["18 images", "16"]),
        (dict(output_format="gif"), SHAPES, ["'gif'", "png, jpeg, webp"]),
        (dict(match_image_size=0), SHAPES, ["match_image_size 0", "needs reference images"]),
        (dict(refs=[img()], match_image_size=2), SHAPES, ["match_image_size 2", "0..0"]),
        (dict(refs=[img()], match_image_size=0, width=64), SHAPES, ["match_image_size 0", "pick one"]),
        (dict(prompt=["a", "b"], refs=[[img()]]), SHAPES, ["1 reference lists for 2 prompts"]),
    ],
)
def test_every_violation_names_field_value_and_limit(kw, spec, pieces):
    with pytest.raises(RequestError) as e:
        validate(req(**kw), spec)
    for piece in pieces:
        assert piece in str(e.value), (piece, str(e.value))


def test_limits_are_configurable():
    with pytest.raises(RequestError, match="3 reference images, more than the limit 2"):
        validate(req(refs=[img()] * 3), SHAPES, Limits(max_refs=2))
    validate(req(refs=[img()] * 12, seed=0), SHAPES, Limits(max_refs=12))
    assert validate(req(steps=500, seed=0), SHAPES, Limits(max_steps=1000)).steps == 500


def test_unreadable_reference_names_the_path(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"hello")
    with pytest.raises(RequestError, match="not_an_image.png"):
        validate(req(refs=[str(bad)]), SHAPES)

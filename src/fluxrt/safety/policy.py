"""Safety policy: which filters, watermark and provenance apply to a model, and the guard that applies them.

Contract:
    SafetyPolicy: frozen config. `SafetyPolicy.default_for(spec_name)`:
        - FLUX.2 models (flux.2-dev, every klein): everything on (NSFW filter, copyright/public-figure check,
          watermark, EXIF/XMP tags, C2PA). The reference filters every output with a Falconsai ViT and the dev
          Mistral (klein uses a dev Mistral too), and the licence requires filters or manual review.
        - fluxrt-shapes (the embedded model): watermark and EXIF/XMP tags on; filters and C2PA off, because they
          need model files (a classifier, a 24B chat model) or a certificate that the embedded model does not ship,
          and it only draws coloured shapes.
    SafetyGuard(policy, nsfw_checker=None, content_filter=None): the runtime. Anything a policy turns on must be
    available when the guard is built (a missing classifier, chat model or certificate raises there, naming what
    is missing): nothing is skipped silently.
        check_prompt(prompt) -> Decision           copyright/public-figure check of a new prompt
        check_image(img) -> Decision               NSFW, then (if not flagged) copyright/public-figure check
        finalize(img, meta) -> (img | None, Decision)  check an output; a flagged one comes back as None and must
                                                   be neither returned nor saved; an allowed one is watermarked
        encode(img, fmt, meta) -> bytes            file bytes with EXIF/XMP tags and a signed C2PA manifest
Every decision is logged (logger "fluxrt.safety.policy") with its reason, never with the image or prompt text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

EMBEDDED_SPEC = "fluxrt-shapes"
ENV_CERT, ENV_KEY = "FLUXRT_C2PA_CERT", "FLUXRT_C2PA_KEY"  # default C2PA signing files


@dataclass(frozen=True)
class SafetyPolicy:
    nsfw: bool = True
    ip_check: bool = True
    watermark: bool = True
    metadata: bool = True  # EXIF Software/Make + XMP digital source type
    c2pa: bool = True
    nsfw_threshold: float = 0.85
    nsfw_backend: str = "auto"  # "auto" | "falconsai" | "open_nsfw"
    c2pa_cert: Path | None = None  # PEM chain, leaf first
    c2pa_key: Path | None = None
    c2pa_alg: str = "es256"

    def __post_init__(self):
        if not 0.0 < self.nsfw_threshold < 1.0:
            raise ValueError(f"nsfw_threshold must be in (0, 1), got {self.nsfw_threshold}")
        if (self.c2pa_cert is None) != (self.c2pa_key is None):
            raise ValueError("give both c2pa_cert and c2pa_key, or neither")

    @classmethod
    def default_for(cls, spec_name: str) -> SafetyPolicy:
        """The default policy of a preset (see the module docstring). C2PA files default to $FLUXRT_C2PA_CERT/KEY."""
        from fluxrt.config import PRESETS

        if spec_name not in PRESETS and not spec_name.startswith("flux.2"):
            raise KeyError(f"no safety defaults for unknown model {spec_name!r}; known: {', '.join(sorted(PRESETS))}")
        cert, key = os.environ.get(ENV_CERT), os.environ.get(ENV_KEY)
        files = {"c2pa_cert": Path(cert), "c2pa_key": Path(key)} if cert and key else {}
        if spec_name == EMBEDDED_SPEC:
            return cls(nsfw=False, ip_check=False, c2pa=bool(files), **files)
        return cls(**files)

    def replace(self, **changes) -> SafetyPolicy:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Decision:
    """The outcome of one check. `allowed` False means: do not return, show or save the image / use the prompt."""

    allowed: bool
    reason: str = ""  # why it was blocked; empty when allowed
    flags: tuple[str, ...] = ()  # "nsfw", "ip"
    scores: Mapping[str, float] = field(default_factory=dict)  # "nsfw": P(nsfw), "ip_margin": logit(yes) - logit(no)
    watermarked: bool = False


class SafetyGuard:
    """Applies a SafetyPolicy; holds the loaded classifier, chat-model filter and C2PA signing files."""

    def __init__(self, policy: SafetyPolicy, nsfw_checker=None, content_filter=None):
        self.policy = policy
        self.nsfw_checker = nsfw_checker
        self.content_filter = content_filter
        # configuration errors first, then the loading that can take a while
        if policy.ip_check and content_filter is None:
            raise ValueError("ip_check is on but no content filter was given: load the chat model with "
                             "fluxrt.safety.ip_check.load_content_filter(...) or turn ip_check off")  # fmt: skip
        self.signer = None
        if policy.c2pa:
            if policy.c2pa_cert is None:
                raise ValueError(f"c2pa is on but no signing certificate is set: set {ENV_CERT} and {ENV_KEY} (PEM "
                                 "chain and key), pass c2pa_cert/c2pa_key, or turn c2pa off")  # fmt: skip
            from fluxrt.safety.provenance import SignerFiles

            self.signer = SignerFiles(policy.c2pa_cert, policy.c2pa_key, policy.c2pa_alg)
        if policy.nsfw and nsfw_checker is None:
            from fluxrt.safety.nsfw import NSFWChecker

            self.nsfw_checker = NSFWChecker(policy.nsfw_threshold, backend=policy.nsfw_backend)
        if policy.watermark:
            from fluxrt.safety import watermark

            watermark._deps()  # fail now, not on the first output, when the extra is missing

    def _log(self, what: str, decision: Decision, meta: Mapping | None = None) -> Decision:
        ctx = " ".join(f"{k}={meta[k]}" for k in ("model", "request_id", "seed") if meta and k in meta)
        if decision.allowed:
            log.info("safety %s: allowed %s %s", what, dict(decision.scores), ctx)
        else:
            log.warning("safety %s: BLOCKED (%s) %s %s", what, decision.reason, dict(decision.scores), ctx)
        return decision

    def check_prompt(self, prompt: str) -> Decision:
        if not self.policy.ip_check:
            return Decision(True)
        v = self.content_filter.check_text(prompt)
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]
        d = Decision(not v.flagged, "the prompt asks for copyrighted material or a public figure" if v.flagged else "",
                     ("ip",) if v.flagged else (), {"ip_margin": v.margin})  # fmt: skip
        return self._log(f"prompt sha256:{digest}", d)

    def _check(self, img: Image.Image) -> Decision:
        scores: dict[str, float] = {}
        if self.policy.nsfw:
            scores["nsfw"] = self.nsfw_checker.score(img)
            if scores["nsfw"] > self.nsfw_checker.threshold:
                reason = f"NSFW classifier score {scores['nsfw']:.3f} > {self.nsfw_checker.threshold}"
                return Decision(False, reason, ("nsfw",), scores)
        if self.policy.ip_check:  # as in the reference, only when the NSFW check passed
            v = self.content_filter.check_image(img)
            scores["ip_margin"] = v.margin
            if v.flagged:
                return Decision(False, "the image shows copyrighted material or a public figure", ("ip",), scores)
        return Decision(True, scores=scores)

    def check_image(self, img: Image.Image) -> Decision:
        """For input (reference) images and outputs alike."""
        return self._log(f"image {img.width}x{img.height}", self._check(img))

    def finalize(self, img: Image.Image, meta: Mapping | None = None) -> tuple[Image.Image | None, Decision]:
        """Check a generated image; `(None, decision)` when blocked, else `(watermarked image, decision)`."""
        d = self._check(img)
        if d.allowed and self.policy.watermark:
            from fluxrt.safety import watermark

            img = watermark.embed(img)
            d = dataclasses.replace(d, watermarked=True)
        self._log(f"output {img.width}x{img.height}", d, meta)
        return (img if d.allowed else None), d

    def encode(self, img: Image.Image, fmt: str = "png", meta: Mapping | None = None) -> bytes:
        """File bytes of a finalized image: EXIF/XMP tags (policy.metadata), then a signed C2PA manifest
        (policy.c2pa). `meta`: "model" (name for the tags and manifest), "references" (edit inputs: paths,
        bytes or PIL images, listed as C2PA ingredients), "title"."""
        from fluxrt.safety import provenance

        meta = meta or {}
        model = meta.get("model", "unknown model")
        if not self.policy.c2pa:
            return provenance.encode_with_metadata(img, fmt, model, tags=self.policy.metadata)
        refs = tuple(meta.get("references", ()))
        info = provenance.ManifestInfo(model, meta.get("title"), refs, metadata=self.policy.metadata)
        return provenance.sign(img, fmt, info, self.signer)


def guard_for(spec, mode: str = "default") -> SafetyGuard:
    """The SafetyGuard of a model's default policy, as `fluxrt generate` and `fluxrt serve` apply it.

    mode "filters-off" keeps the watermark and tags only. C2PA is off in the guard: the callers sign the final
    file bytes at save time (`provenance.signer_for`). A policy that needs the dev chat model raises a RequestError
    naming it when it is not in the local Hugging Face cache.
    """
    from ..config import MISTRAL_SMALL
    from ..request import RequestError

    policy = SafetyPolicy.default_for(spec.name if spec.name.startswith(("flux.2", "fluxrt")) else "flux.2-dev")
    if mode == "filters-off":
        policy = policy.replace(nsfw=False, ip_check=False)
    policy = policy.replace(c2pa=False, c2pa_cert=None, c2pa_key=None)
    content_filter = None
    if policy.ip_check:
        from .ip_check import load_content_filter

        try:
            content_filter = load_content_filter(MISTRAL_SMALL.repo_id)
        except Exception as e:  # no local chat model: say what is missing and how to proceed
            raise RequestError(f"the copyright/public-figure filter needs {MISTRAL_SMALL.repo_id} in the local "
                               f"Hugging Face cache ({e}); or pass --safety filters-off") from None  # fmt: skip
    try:
        return SafetyGuard(policy, content_filter=content_filter)
    except (ValueError, ImportError) as e:
        raise RequestError(f"safety policy of {spec.name}: {e}") from None

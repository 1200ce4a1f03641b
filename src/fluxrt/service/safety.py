"""The service's safety guard: the model's default SafetyPolicy, built exactly as `fluxrt generate` builds it.

Contract: service_guard(spec, mode="default" | "filters-off") -> SafetyGuard. Flagged outputs are neither returned
nor saved (the worker fails the job with the guard's reason) and every decision goes to the store's `decisions`
table (subject, allowed, reason, flags, scores: never the image or the prompt text).
"""

from __future__ import annotations


def service_guard(spec, mode: str = "default"):
    from ..cli import _safety_guard  # one place decides what a model's policy is, for the CLI and the server

    return _safety_guard(spec, mode)

"""Safety: content filters, invisible watermark and provenance metadata (FLUX2_REFERENCE.md section 10).

Integration in three calls (docs/SAFETY.md):
    guard = SafetyGuard(SafetyPolicy.default_for(spec.name), content_filter=...)
    guard.check_prompt(prompt) / guard.check_image(reference)   -> Decision (inputs)
    img, decision = guard.finalize(output, meta)                -> None when blocked, else watermarked
    data = guard.encode(img, "png", meta)                       -> bytes with EXIF/XMP + C2PA
Modules: `watermark` (48-bit invisible mark), `provenance` (EXIF/XMP, C2PA), `nsfw` (image classifier),
`ip_check` (copyright / public-figure yes/no question to a chat LM), `policy` (defaults and the guard).
The heavy dependencies (invisible-watermark, opencv, c2pa-python, onnxruntime) come with the `safety` extra and are
imported on first use.
"""

from fluxrt.safety.policy import Decision, SafetyGuard, SafetyPolicy, guard_for

__all__ = ["Decision", "SafetyGuard", "SafetyPolicy", "guard_for"]

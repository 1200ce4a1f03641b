"""Uploaded images: an allow-list of formats, size and pixel limits, and decompression-bomb protection.

Contract:
    decode_upload(data, field, limits) -> RGB PIL image, or raises ApiError (4xx) naming `field`:
        413 for a file over `max_file_bytes` or an image over `max_pixels` (read from the header, before any pixel
        is decoded: a 100 kB PNG that claims 50000 x 50000 is refused without inflating it), 415 for a format not
        in the allow-list (PNG, JPEG, WebP, recognised by their magic bytes, never by the file name or the
        client's content type), 400 for a file that does not decode.
The decoded pixels are what the service keeps (re-encoded as PNG): the uploaded bytes are never written to disk.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from .errors import ApiError

# magic bytes -> PIL format name; the allow-list
MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))
ALLOWED = ("PNG", "JPEG", "WEBP")


def sniff(data: bytes) -> str | None:
    """The allowed format of `data` from its first bytes, or None."""
    for magic, fmt in MAGIC:
        if data.startswith(magic):
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_upload(data: bytes, field: str, limits) -> Image.Image:
    if len(data) > limits.max_file_bytes:
        raise ApiError(413, f"{field} is {len(data)} bytes, more than the limit {limits.max_file_bytes}", field)
    if not data:
        raise ApiError(400, f"{field} is an empty file", field)
    fmt = sniff(data)
    if fmt is None:
        raise ApiError(415, f"{field} is not a PNG, JPEG or WebP image (first bytes {data[:8]!r})", field,
                       "unsupported_image_format")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own guard, as an error
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ApiError(413, f"{field}: {e}", field, "image_too_large") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted bytes is bad input
            raise ApiError(400, f"{field} is not a readable {fmt} image ({type(e).__name__}: {e})", field) from None
        w, h = im.size
        if w * h > limits.max_pixels:
            raise ApiError(413, f"{field} is {w}x{h} = {w * h} pixels, more than the limit {limits.max_pixels}",
                           field, "image_too_large")  # fmt: skip
        try:
            im.seek(0)  # animated PNG / WebP: the first frame only
            return im.convert("RGB")
        except Exception as e:  # noqa: BLE001
            raise ApiError(400, f"{field} is not a readable {fmt} image ({type(e).__name__}: {e})", field) from None

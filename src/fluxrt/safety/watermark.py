"""Invisible watermark: a fixed 48-bit payload in every output, robust to JPEG q80, a 50% resize and PNG.

Contract: `embed(img) -> img` (same size; RGB, or RGBA with the alpha kept), `detect(img) -> (found, bit_accuracy)`,
`read_payload(img) -> int`. No state, no model files.

Method. The per-block coder is invisible-watermark's `dwtDctSvd` (`imwatermark.dwtDctSvd.EmbedDwtDctSvd`): in the
chroma channel U, Haar DWT -> 4x4 blocks of the LL band -> DCT -> SVD, and the largest singular value is quantised
to an odd or even quarter of `scale` to carry one bit; the message repeats over all blocks and the decoder takes a
majority vote per bit. Used as the reference uses the library (`WatermarkEncoder.encode` on the full-size image),
it failed our targets (measured in bench/watermark_robustness.py, see docs/SAFETY.md): a 50% resize breaks the
block grid (and the library refuses images under 256x256), saturated backgrounds lose bits to clipping even
without any attack, and `encode` swaps the horizontal and vertical DWT detail bands when it rebuilds the image.
So we keep the block coder and wrap it:
1. A fixed working size (256x256): the coder runs on the image resized to 256x256 (area filter), and only the
   change it makes there is resized back (bicubic) and added to the full-size image. The detector resizes any
   image to 256x256 too, so the grid lines up after any uniform (or aspect-changing) resize.
2. Three passes of embed -> clip/round -> re-measure, so the bits survive clipping, 8-bit rounding and the
   resampling of the change.
3. The DWT is rebuilt with its bands in the right order; all arithmetic is float.

Payload: 40 bits of the constant b"FLUXR" + 8 bits of the scheme version, all 48 kept (the reference builds its
bit list with `bin(msg)[2:]`, which drops leading zeros and embeds 46 of its "48" bits). The payload is XORed with a
fixed whitening key before embedding so the embedded bits are balanced (24 ones): a flat or grey image, which votes
the same value for every bit, then agrees with the message on exactly half of the bits.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

WATERMARK_MAGIC = b"FLUXR"  # 40 bits
WATERMARK_VERSION = 1  # 8 bits; bump when the embedding scheme changes
WATERMARK_PAYLOAD = int.from_bytes(WATERMARK_MAGIC, "big") << 8 | WATERMARK_VERSION
PAYLOAD_BITS = 48
# First 48 bits of the fraction of e (nothing up the sleeve); payload ^ key has 24 ones.
WHITENING_KEY = 0xB7E151628AED

WORK_SIZE = 256  # the smallest output we make (the embedded model's 256x256) sets the grid
SCALE = 36.0  # quantisation step of the singular value: the library's default for U; PSNR ~40 dB
PASSES = 3  # embed/clip/round passes; 1 pass leaves saturated areas wrong, 3 reach 100% bit recovery
MIN_SIDE = 64  # below this the resampled blocks carry too little to vote on
# Bit agreement needed to call an image marked. Clean photos and renders measure at most ~0.65
# (chance: 0.5 +- 0.072); marked images after JPEG q80 or a 50% resize measure 1.0 (docs/SAFETY.md).
DETECT_THRESHOLD = 0.8

_CHANNEL = 1  # YUV index of U
_INSTALL_HINT = "the watermark needs the `safety` extra: pip install 'fluxrt[safety]' (invisible-watermark, opencv)"


def _deps():
    try:
        import cv2
        import pywt
        from imwatermark.dwtDctSvd import EmbedDwtDctSvd
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return cv2, pywt, EmbedDwtDctSvd


def payload_bits(payload: int = WATERMARK_PAYLOAD, key: int = WHITENING_KEY) -> list[int]:
    """The 48 embedded bits, most significant first, leading zeros kept."""
    if not 0 <= payload < 1 << PAYLOAD_BITS:
        raise ValueError(f"payload {payload:#x} does not fit in {PAYLOAD_BITS} bits")
    return [int(b) for b in format(payload ^ key, f"0{PAYLOAD_BITS}b")]


WATERMARK_BITS = payload_bits()


def _rgb_float(img: Image.Image) -> np.ndarray:
    if min(img.size) < MIN_SIDE:
        raise ValueError(f"image {img.size} is too small for the watermark; the shorter side must be >= {MIN_SIDE}")
    return np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]


def _resize(cv2, a: np.ndarray, w: int, h: int) -> np.ndarray:
    if a.shape[1] == w and a.shape[0] == h:
        return a.copy()
    shrink = w * h < a.shape[0] * a.shape[1]
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _embed_work(z: np.ndarray, bits: list[int]) -> np.ndarray:
    """Mark a (WORK_SIZE, WORK_SIZE, 3) float RGB image; returns it unclipped."""
    cv2, pywt, EmbedDwtDctSvd = _deps()
    yuv = cv2.cvtColor(z, cv2.COLOR_RGB2YUV)
    ll, details = pywt.dwt2(yuv[:, :, _CHANNEL].astype(np.float64), "haar")  # ll: (128, 128)
    EmbedDwtDctSvd(bits, len(bits), block=4).encode_frame(ll, SCALE)  # in place, one bit per 4x4 block
    yuv[:, :, _CHANNEL] = pywt.idwt2((ll, details), "haar")
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB)


def embed(img: Image.Image, bits: list[int] | None = None) -> Image.Image:
    """`img` with the watermark; same size, RGB (RGBA keeps its alpha). Deterministic."""
    cv2, _, _ = _deps()
    bits = WATERMARK_BITS if bits is None else bits
    x = _rgb_float(img)
    h, w = x.shape[:2]
    out = x
    for _ in range(PASSES):
        z = _resize(cv2, out, WORK_SIZE, WORK_SIZE)
        change = _embed_work(z, bits) - z  # what the coder wants at the working size
        out = np.clip(out + _resize(cv2, change, w, h), 0, 255).round()  # round: score what will be saved
    marked = Image.fromarray(out.astype(np.uint8), "RGB")
    if img.mode in ("RGBA", "LA"):
        marked.putalpha(img.getchannel("A"))
    return marked


def bit_votes(img: Image.Image, n_bits: int = PAYLOAD_BITS) -> np.ndarray:
    """Per embedded bit, the fraction of its blocks that read 1: shape (n_bits,), values in [0, 1]."""
    cv2, pywt, EmbedDwtDctSvd = _deps()
    z = _resize(cv2, _rgb_float(img), WORK_SIZE, WORK_SIZE)
    u = cv2.cvtColor(z, cv2.COLOR_RGB2YUV)[:, :, _CHANNEL].astype(np.float64)
    ll, _ = pywt.dwt2(u, "haar")
    votes: list[list[int]] = [[] for _ in range(n_bits)]
    EmbedDwtDctSvd([], n_bits, block=4).decode_frame(ll, SCALE, votes)
    return np.array([np.mean(v) for v in votes])


def bit_accuracy(img: Image.Image, bits: list[int] | None = None) -> float:
    """Fraction of the embedded bits read back correctly (0.5 is chance)."""
    bits = WATERMARK_BITS if bits is None else bits
    read = bit_votes(img, len(bits)) > 0.5
    return float(np.mean(read == np.asarray(bits, dtype=bool)))


def detect(img: Image.Image, threshold: float = DETECT_THRESHOLD) -> tuple[bool, float]:
    """`(found, bit_accuracy)`: found when at least `threshold` of the 48 bits agree with ours."""
    acc = bit_accuracy(img)
    return acc >= threshold, acc


def read_payload(img: Image.Image) -> int:
    """The 48-bit payload as read (majority per bit, un-whitened); `>> 8` is the magic, `& 0xFF` the version."""
    read = "".join("1" if v > 0.5 else "0" for v in bit_votes(img))
    return int(read, 2) ^ WHITENING_KEY

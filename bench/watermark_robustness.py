"""Robustness and false-positive rate of the invisible watermark (fluxrt.safety.watermark), on the CPU.

    python bench/watermark_robustness.py --library-baseline --out bench/results/watermark_robustness.json

Marked set: shapes-world renders at 256 and 512 px (`fluxrt.world.render`) and the colour photos that ship
inside scikit-image (`skimage.data`), upscaled to >= 256 px on the short side, plus 1024x1024 upscales.
Each marked image goes through every attack below and `detect()` is asked whether the mark is there.
Clean set: the same sources unmarked, plus random crops and rescales of every scikit-image sample (grey and
colour), each also after JPEG q80 and a 50% resize; a detection there is a false positive.
Prints a table and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import time

import numpy as np
from PIL import Image

from fluxrt.safety import watermark as wm
from fluxrt.world import render, sample_scene

COLOUR_PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "stereo_motorcycle",
    "colorwheel",
]
GREY_PHOTOS = ["camera", "moon", "brick", "grass", "gravel", "coins", "clock", "page", "text", "cell"]


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def png(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def scale(img: Image.Image, f: float) -> Image.Image:
    return img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.BICUBIC)


ATTACKS = {
    "png": png,
    "jpeg90": lambda x: jpeg(x, 90),
    "jpeg80": lambda x: jpeg(x, 80),
    "jpeg70": lambda x: jpeg(x, 70),
    "jpeg50": lambda x: jpeg(x, 50),
    "resize50": lambda x: scale(x, 0.5),
    "resize75": lambda x: scale(x, 0.75),
    "resize200": lambda x: scale(x, 2.0),
    "resize50+jpeg80": lambda x: jpeg(scale(x, 0.5), 80),
    "jpeg80+resize50": lambda x: scale(jpeg(x, 80), 0.5),
}


def photo(name: str) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    a = a[0] if isinstance(a, tuple) else a  # stereo_motorcycle is (left, right, disparity)
    img = Image.fromarray(a if a.ndim == 3 else np.stack([a] * 3, -1)).convert("RGB")
    f = 256 / min(img.size)
    return scale(img, f) if f > 1 else img


def marked_sources(n_scenes: int):
    for s in range(n_scenes):
        for size in (256, 512):
            yield f"render{s}@{size}", render(sample_scene(1000 + s), size)
    for name in COLOUR_PHOTOS:
        yield name, photo(name)
    for name in COLOUR_PHOTOS[:3]:
        yield f"{name}@1024", photo(name).resize((1024, 1024), Image.Resampling.BICUBIC)


def clean_sources(n_scenes: int, n_crops: int, rng: random.Random):
    for s in range(n_scenes):
        yield f"render{s}@256", render(sample_scene(2000 + s), 256)
    for name in COLOUR_PHOTOS + GREY_PHOTOS:
        img = photo(name)
        yield name, img
        for k in range(n_crops):
            w, h = img.size
            cw, ch = rng.randint(min(w, 128), w), rng.randint(min(h, 128), h)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            crop = img.crop((x, y, x + cw, y + ch))
            yield f"{name}/crop{k}", scale(crop, rng.uniform(0.8, 2.0))


def run(n_scenes: int, n_crops: int, seed: int) -> dict:
    rows, embed_s, psnrs = {a: [] for a in ATTACKS}, [], []
    for name, img in marked_sources(n_scenes):
        t0 = time.perf_counter()
        marked = wm.embed(img)
        embed_s.append(time.perf_counter() - t0)
        err = np.asarray(marked, dtype=np.float64) - np.asarray(img.convert("RGB"), dtype=np.float64)
        psnrs.append(10 * np.log10(255**2 / max(np.mean(err**2), 1e-12)))
        for attack, fn in ATTACKS.items():
            rows[attack].append((name, wm.bit_accuracy(fn(marked))))
    clean = []
    for name, img in clean_sources(n_scenes, n_crops, random.Random(seed)):
        for variant, fn in (("", lambda x: x), ("+jpeg80", ATTACKS["jpeg80"]), ("+resize50", ATTACKS["resize50"])):
            x = fn(img)
            if min(x.size) >= wm.MIN_SIDE:
                clean.append((name + variant, wm.bit_accuracy(x)))
    thr = wm.DETECT_THRESHOLD
    summary = {
        a: {
            "n": len(r),
            "detected": sum(acc >= thr for _, acc in r),
            "min_bit_acc": min(acc for _, acc in r),
            "mean_bit_acc": float(np.mean([acc for _, acc in r])),
        }
        for a, r in rows.items()
    }
    accs = np.array([acc for _, acc in clean])
    return {
        "threshold": thr,
        "work_size": wm.WORK_SIZE,
        "scale": wm.SCALE,
        "passes": wm.PASSES,
        "marked": summary,
        "embed_seconds_median": float(np.median(embed_s)),
        "psnr_db_min": float(min(psnrs)),
        "psnr_db_median": float(np.median(psnrs)),
        "clean": {
            "n": len(clean),
            "false_positives": int((accs >= thr).sum()),
            "max_bit_acc": float(accs.max()),
            "mean_bit_acc": float(accs.mean()),
            "p99_bit_acc": float(np.quantile(accs, 0.99)),
            "worst": sorted(clean, key=lambda t: -t[1])[:5],
        },
        "per_image": {a: r for a, r in rows.items()},
        "platform": platform.platform(),
    }


def library_baseline(n_scenes: int) -> dict:
    """The library used as the reference uses it: `WatermarkEncoder.encode(bgr, "dwtDctSvd")` on the full-size
    image, `WatermarkDecoder.decode` on the attacked one (which refuses images under 256x256: counted as missed)."""
    import cv2
    from imwatermark import WatermarkDecoder, WatermarkEncoder

    enc = WatermarkEncoder()
    enc.set_watermark("bits", wm.WATERMARK_BITS)
    dec = WatermarkDecoder("bits", len(wm.WATERMARK_BITS))
    attacks = {a: ATTACKS[a] for a in ("png", "jpeg80", "resize50")}
    rows = {a: [] for a in attacks}
    for name, img in marked_sources(n_scenes):
        bgr = cv2.cvtColor(np.asarray(img.convert("RGB")), cv2.COLOR_RGB2BGR).astype(np.float32)
        out = np.clip(enc.encode(bgr, "dwtDctSvd"), 0, 255).round().astype(np.uint8)
        marked = Image.fromarray(cv2.cvtColor(out, cv2.COLOR_BGR2RGB))
        for attack, fn in attacks.items():
            x = cv2.cvtColor(np.asarray(fn(marked).convert("RGB")), cv2.COLOR_RGB2BGR)
            try:
                bits = np.asarray(dec.decode(x, "dwtDctSvd"), dtype=bool)
                acc = float(np.mean(bits == np.asarray(wm.WATERMARK_BITS, dtype=bool)))
            except RuntimeError:  # "image too small"
                acc = None
            rows[attack].append((name, acc))
    thr = wm.DETECT_THRESHOLD
    return {
        a: {"n": len(r), "detected": sum(acc is not None and acc >= thr for _, acc in r),
            "too_small": sum(acc is None for _, acc in r)}
        for a, r in rows.items()
    }  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=12, help="shapes-world scenes (marked: at 256 and 512 px)")
    ap.add_argument("--crops", type=int, default=6, help="random crops per scikit-image sample in the clean set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the full result as JSON here")
    ap.add_argument("--library-baseline", action="store_true", help="also measure plain imwatermark dwtDctSvd")
    args = ap.parse_args()
    res = run(args.scenes, args.crops, args.seed)
    print(f"threshold {res['threshold']}, work size {res['work_size']}, scale {res['scale']}, passes {res['passes']}")
    print(
        f"embed: median {res['embed_seconds_median'] * 1e3:.0f} ms; PSNR min {res['psnr_db_min']:.1f} dB, "
        f"median {res['psnr_db_median']:.1f} dB"
    )
    print(f"{'attack':18s} {'detected':>10s} {'min acc':>8s} {'mean acc':>9s}")
    for a, s in res["marked"].items():
        print(f"{a:18s} {s['detected']:>4d}/{s['n']:<5d} {s['min_bit_acc']:8.3f} {s['mean_bit_acc']:9.3f}")
    c = res["clean"]
    print(
        f"clean: {c['false_positives']}/{c['n']} false positives; bit accuracy max {c['max_bit_acc']:.3f}, "
        f"p99 {c['p99_bit_acc']:.3f}, mean {c['mean_bit_acc']:.3f}; worst {c['worst'][:3]}"
    )
    if args.library_baseline:
        res["library_baseline"] = library_baseline(args.scenes)
        print("plain imwatermark dwtDctSvd at full size (the reference's way of calling it):")
        for a, s in res["library_baseline"].items():
            print(f"  {a:16s} detected {s['detected']}/{s['n']} (refused as too small: {s['too_small']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

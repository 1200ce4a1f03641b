"""Parse shapes-world images back into scenes and score them.

Classic image processing only (numpy + Pillow):

1. background = median of the border pixels, snapped to the nearest named
   background colour;
2. foreground mask = pixels whose 3x3-averaged colour is farther than half
   the smallest object/background palette distance from the observed
   background colour;
3. 8-connected components (run-length union-find, pure numpy/Python);
   components smaller than ``MIN_AREA_FRACTION`` of a cell are noise;
4. per component: colour = palette colour nearest to the median interior
   pixel (allowing for blur towards the background, see :func:`snap_colour`);
   a soft coverage map ``alpha`` (projection of each pixel onto the
   background->object colour line) gives the sub-pixel area and centroid;
   shape = best least-squares fit among templates of each shape rendered with
   the observed area and centroid (and a few blur levels), see
   :func:`fit_shape`; size from the implied bounding-box side relative to
   the cell (threshold halfway between small and large); cell from the
   centroid.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .scene import (BACKGROUNDS, COLOURS, GRID, SHAPES, SIZE_FRACTION, ComposeTask, EditTask,
                    Scene, SceneObject, draw_shape)

ImageLike = Union[Image.Image, np.ndarray]

MIN_AREA_FRACTION = 0.025  # of a cell's area; smallest object (small triangle) is ~0.10
SIZE_THRESHOLD = (SIZE_FRACTION["small"] + SIZE_FRACTION["large"]) / 2
# Area / extent**2 of each shape (extent = bounding-box side).
SHAPE_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
# Blur levels (Gaussian sigma, pixels) tried when fitting shape templates.
FIT_BLURS = (0.0, 0.5, 1.0, 1.5)
TEMPLATE_SUPERSAMPLE = 4

_OBJ_NAMES = list(COLOURS)
_OBJ_RGB = np.array([COLOURS[n] for n in _OBJ_NAMES], dtype=np.float64)
_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class ParsedScene:
    """Parser output.  ``objects`` are ``(shape, colour, size, cell)`` tuples.

    Unlike :class:`Scene` it may be invalid (0 or >3 objects, shared cells).
    ``features`` holds per-object measurements for debugging.
    """

    background: str
    objects: tuple[SceneObject, ...]
    features: tuple[dict, ...] = field(default=(), compare=False, hash=False, repr=False)

    def to_scene(self) -> Scene | None:
        """The equivalent :class:`Scene`, or None if the parse is not a valid scene."""
        try:
            return Scene(self.background, self.objects)
        except ValueError:
            return None


# --------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------

def to_pil(img: ImageLike, size_hint: int | None = None) -> Image.Image:
    """RGB PIL image.  ndarray input is HxWx3, uint8 or float (max <= 1 means 0..1 scale).

    If ``size_hint`` is given and differs from the image size, the image is
    resized (bilinear) to ``size_hint`` x ``size_hint``.
    """
    if isinstance(img, Image.Image):
        pil = img.convert("RGB")
    else:
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected HxWx3 array, got shape {arr.shape}")
        if arr.dtype.kind == "f" and arr.max() <= 1.0:
            arr = arr * 255.0
        pil = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if size_hint is not None and pil.size != (size_hint, size_hint):
        pil = pil.resize((size_hint, size_hint), Image.Resampling.BILINEAR)
    return pil


def degrade(img: Image.Image, noise_sigma: float = 8.0, blur_radius: float = 0.7,
            seed: int = 0) -> Image.Image:
    """Gaussian blur then additive Gaussian noise (sigma in 0..255 units); for robustness tests."""
    if blur_radius > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur_radius))
    arr = np.asarray(img, dtype=np.float64)
    arr = arr + np.random.default_rng(seed).normal(0.0, noise_sigma, arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _nearest(rgb: np.ndarray, table: np.ndarray, names: list[str]) -> str:
    return names[int(np.argmin(np.linalg.norm(table - rgb, axis=1)))]


def snap_colour(rgb: np.ndarray, bg_rgb: np.ndarray, t_min: float = 0.5) -> str:
    """Palette colour ``c`` whose segment ``bg + t (c - bg)``, ``t in [t_min, 1]``, is nearest to ``rgb``.

    Blur mixes small objects with the background, pulling their colour along
    that segment; plain nearest-colour snapping would then drift.
    """
    v = _OBJ_RGB - bg_rgb
    t = np.clip(((rgb - bg_rgb) * v).sum(axis=1) / np.maximum((v * v).sum(axis=1), 1.0), t_min, 1.0)
    dist = np.linalg.norm(bg_rgb + t[:, None] * v - rgb, axis=1)
    return _OBJ_NAMES[int(np.argmin(dist))]


def _border_pixels(arr: np.ndarray) -> np.ndarray:
    return np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])


def _shift_or(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    tmp = out.copy()
    out[:, 1:] |= tmp[:, :-1]
    out[:, :-1] |= tmp[:, 1:]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (outside the array counts as background)."""
    m = np.pad(mask, 1)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


# --------------------------------------------------------------------------
# Connected components
# --------------------------------------------------------------------------

def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labelling of a boolean mask: ``(labels, n)``, labels 1..n, 0 = background.

    Rows are run-length encoded with numpy; runs in adjacent rows that touch
    (including diagonally) are merged with a union-find.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # exclusive ends, same row-major order as starts
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(h + 1))
    for r in range(1, h):
        a, b = row_first[r - 1], row_first[r]  # runs of row r-1: [a, b)
        c, e = b, row_first[r + 1]  # runs of row r: [c, e)
        i, j = a, c
        while i < b and j < e:
            if starts[i] <= ends[j] and starts[j] <= ends[i]:  # touch incl. diagonal
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    labels = np.zeros((h, w), dtype=np.int32)
    roots: dict[int, int] = {}
    for k in range(len(rows)):
        lab = roots.setdefault(find(k), len(roots) + 1)
        labels[rows[k], starts[k]:ends[k]] = lab
    return labels, len(roots)


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """``n`` x ``n`` matrix applying a 1-D Gaussian (zero padding) along an axis."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True).max()


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (zero padding)."""
    if sigma <= 0:
        return a
    return _blur_matrix(a.shape[0], sigma) @ a @ _blur_matrix(a.shape[1], sigma).T


def shape_template(shape: str, cx: float, cy: float, extent: float,
                   hw: tuple[int, int]) -> np.ndarray:
    """Coverage (0..1) of ``shape`` centred at ``(cx, cy)`` on an ``hw`` pixel grid."""
    ss = TEMPLATE_SUPERSAMPLE
    h, w = hw
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, cx * ss, cy * ss, extent * ss, 255)
    small = canvas.resize((w, h), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def fit_shape(alpha: np.ndarray, cx: float, cy: float, area: float) -> dict[str, float]:
    """Template-fit error per shape: ``min over blur of sum (alpha - template)**2 / area``.

    Each template has the observed area and centroid ``(cx, cy)`` (crop pixel
    coordinates), so the fit is independent of size and position and tolerant
    to blur (searched over :data:`FIT_BLURS`) and noise.
    """
    errs = {}
    for shape in SHAPES:
        extent = float(np.sqrt(area / SHAPE_FILL[shape]))
        gy = cy - extent / 6 if shape == "triangle" else cy
        tmpl = shape_template(shape, cx, gy, extent, alpha.shape)
        errs[shape] = min(float(((_gaussian_blur(tmpl, s) - alpha) ** 2).sum()) / area
                          for s in FIT_BLURS)
    return errs


def _component_features(arr: np.ndarray, labels: np.ndarray, k: int, bg_rgb: np.ndarray,
                        box: tuple[int, int, int, int], min_area: float) -> dict | None:
    """Measurements of component ``k`` inside ``box`` = (y0, y1, x0, x1) (already padded).

    None if its coverage-weighted area is below ``min_area`` (noise).
    """
    y0, y1, x0, x1 = box
    crop, lab = arr[y0:y1, x0:x1], labels[y0:y1, x0:x1]
    m = lab == k
    core = _erode(m)
    pix = crop[core] if core.sum() >= 3 else crop[m]
    obj_rgb = np.median(pix, axis=0)
    colour = snap_colour(obj_rgb, bg_rgb)
    v = _OBJ_RGB[_OBJ_NAMES.index(colour)] - bg_rgb
    region = _shift_or(_shift_or(m)) & ((lab == 0) | m)
    # Unclipped projection: zero-mean noise stays zero-mean, so area/centroid are unbiased.
    alpha = np.clip((crop - bg_rgb) @ v / max(float(v @ v), 1.0), -0.5, 1.5) * region
    area = float(alpha.sum())
    if not area >= min_area:
        return None
    width, height = float(alpha.sum(axis=1).max()), float(alpha.sum(axis=0).max())
    ys, xs = np.mgrid[0:y1 - y0, 0:x1 - x0] + 0.5  # pixel centres, crop coordinates
    cy, cx = float((alpha * ys).sum() / area), float((alpha * xs).sum() / area)
    errs = fit_shape(alpha, cx, cy, area)
    shape = min(errs, key=errs.get)
    return {"rgb": obj_rgb, "colour": colour, "area": area, "width": width, "height": height,
            "cx": cx + x0, "cy": cy + y0, "fill": area / max(width * height, 1e-9),
            "fit_errors": errs, "shape": shape,
            "extent": float(np.sqrt(area / SHAPE_FILL[shape]))}


def _to_object(f: dict, cell_h: float, cell_w: float) -> SceneObject:
    extent = f["extent"] / np.sqrt(cell_h * cell_w)
    row = int(np.clip(f["cy"] // cell_h, 0, GRID - 1))
    col = int(np.clip(f["cx"] // cell_w, 0, GRID - 1))
    return SceneObject(f["shape"], f["colour"],
                       "large" if extent >= SIZE_THRESHOLD else "small", (row, col))


def _foreground_mask(pil: Image.Image, bg_rgb: np.ndarray, thr: float) -> np.ndarray:
    """Pixels whose 3x3-averaged colour is farther than ``thr`` from the background.

    Averaging divides pixel noise by 3, so isolated noisy pixels do not form specks.
    """
    smooth = np.asarray(pil.filter(ImageFilter.BoxBlur(1)), dtype=np.float32)
    diff = smooth - bg_rgb.astype(np.float32)
    return (diff * diff).sum(axis=-1) > thr * thr


def parse_image(img: ImageLike, size_hint: int | None = None) -> ParsedScene:
    """Recover background and objects from a (possibly noisy) shapes-world image.

    Objects are returned sorted by cell.  Never raises on odd content: an
    empty or cluttered image yields 0 or many objects.
    """
    pil = to_pil(img, size_hint)
    arr = np.asarray(pil, dtype=np.float64)
    h, w = arr.shape[:2]
    bg_rgb = np.median(_border_pixels(arr), axis=0)
    bg_name = _nearest(bg_rgb, _BG_RGB, _BG_NAMES)
    thr = 0.5 * float(np.linalg.norm(_OBJ_RGB - np.array(BACKGROUNDS[bg_name]), axis=1).min())
    labels, n = label_components(_foreground_mask(pil, bg_rgb, thr))
    cell_h, cell_w = h / GRID, w / GRID
    min_area = MIN_AREA_FRACTION * cell_h * cell_w
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    objects, feats = [], []
    for k in (k for k in range(1, n + 1) if areas[k] >= min_area):
        ys, xs = np.nonzero(labels == k)
        box = (max(ys.min() - 3, 0), min(ys.max() + 4, h), max(xs.min() - 3, 0), min(xs.max() + 4, w))
        f = _component_features(arr, labels, int(k), bg_rgb, box, 0.5 * min_area)
        if f is None:
            continue
        objects.append(_to_object(f, cell_h, cell_w))
        feats.append(f)
    order = sorted(range(len(objects)), key=lambda i: objects[i].cell)
    return ParsedScene(bg_name, tuple(objects[i] for i in order), tuple(feats[i] for i in order))


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------

ATTRIBUTES = ("shape", "colour", "size", "cell")


def _agreement(a: SceneObject, b: SceneObject) -> int:
    return sum(getattr(a, k) == getattr(b, k) for k in ATTRIBUTES)


def match_objects(parsed: Sequence[SceneObject], target: Sequence[SceneObject]
                  ) -> list[tuple[SceneObject | None, SceneObject | None]]:
    """One-to-one matching maximising the number of agreeing attributes.

    Returns ``(parsed_obj, target_obj)`` pairs covering every object of both
    lists; unmatched objects are paired with None.  Exhaustive search (both
    lists are tiny); with more than 8 parsed objects, greedy matching.
    """
    parsed, target = list(parsed), list(target)
    if len(parsed) > 8:
        return _greedy_match(parsed, target)
    best, best_score = (), -1
    k = min(len(parsed), len(target))
    for p_idx in itertools.permutations(range(len(parsed)), k):
        for t_idx in itertools.combinations(range(len(target)), k):
            s = sum(_agreement(parsed[i], target[j]) for i, j in zip(p_idx, t_idx))
            if s > best_score:
                best, best_score = tuple(zip(p_idx, t_idx)), s
    return _with_unmatched(parsed, target, list(best))


def _greedy_match(parsed: list, target: list) -> list:
    pairs = sorted(((-_agreement(p, t), i, j) for i, p in enumerate(parsed)
                    for j, t in enumerate(target)))
    used_p, used_t, chosen = set(), set(), []
    for _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i), used_t.add(j), chosen.append((i, j))
    return _with_unmatched(parsed, target, chosen)


def _with_unmatched(parsed: list, target: list, chosen: list) -> list:
    out = [(parsed[i], target[j]) for i, j in chosen]
    mp, mt = {i for i, _ in chosen}, {j for _, j in chosen}
    out += [(p, None) for i, p in enumerate(parsed) if i not in mp]
    out += [(None, t) for j, t in enumerate(target) if j not in mt]
    return out


def score(parsed: ParsedScene | Scene, target: Scene) -> dict:
    """Compare a parse with the intended scene.

    Returns ``background`` (bool), ``count`` (same number of objects),
    ``shape``/``colour``/``size``/``position`` (fraction of target objects whose
    matched parsed object has that attribute right; unmatched = wrong),
    ``n_parsed``, ``n_target`` and ``exact`` (background right, same count,
    every object matched with all attributes right).
    """
    pairs = match_objects(parsed.objects, target.objects)
    matched = [(p, t) for p, t in pairs if p is not None and t is not None]
    n_t = len(target.objects)
    out = {"background": parsed.background == target.background,
           "count": len(parsed.objects) == n_t,
           "n_parsed": len(parsed.objects), "n_target": n_t}
    for name, attr in (("shape", "shape"), ("colour", "colour"), ("size", "size"),
                       ("position", "cell")):
        out[name] = sum(getattr(p, attr) == getattr(t, attr) for p, t in matched) / max(n_t, 1)
    out["exact"] = (out["background"] and out["count"]
                    and all(_agreement(p, t) == len(ATTRIBUTES) for p, t in matched))
    return out


def edit_preserved(parsed_output: ParsedScene | Scene, task: EditTask | ComposeTask) -> bool:
    """True iff the parsed output matches ``task.target`` exactly
    (the edit/composition was applied and nothing else changed)."""
    return bool(score(parsed_output, task.target)["exact"])


def evaluate_image(img: ImageLike, target: Scene) -> dict:
    """``score(parse_image(img), target)``."""
    return score(parse_image(img), target)

"""Shapes world: data model, seeded sampling, rendering, captions and tasks.

A scene is a named background colour plus 1..3 flat-coloured objects placed
on a 3x3 grid (at most one object per cell, each centred in its cell).
Everything here is a pure function of an integer seed (or a ``random.Random``
passed in), so datasets are reproducible without storing images.

Held-out split rule (see :func:`is_held_out`): one (colour, shape) pair per
shape is held out, each with a different colour: for each shape in order, the
not-yet-used colour with the smallest CRC32 of ``"colour:shape"`` (4 of the 32
pairs).  Every colour and every shape thus still appears in training with
other partners, so neither predicts the other.  ``split="train"`` samples never
contain a held-out pair; ``split="heldout"`` samples always contain at least
one; ``split="all"`` ignores the rule.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import NamedTuple, Sequence, Union

from PIL import Image, ImageDraw

# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Object palette (RGB).  Pairwise distance >= 94, distance to every background
# >= 95, and disjoint from the background palette, so an object's colour can
# never equal the background's.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 225, 40),
    "purple": (140, 50, 180),
    "orange": (240, 125, 25),
    "cyan": (40, 200, 215),
    "pink": (235, 100, 180),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "beige": (225, 210, 175),
}

SIZES: tuple[str, ...] = ("small", "large")
# Object extent (bounding-box side) as a fraction of the grid-cell side.
SIZE_FRACTION: dict[str, float] = {"small": 0.45, "large": 0.8}

GRID = 3
CELLS: tuple[tuple[int, int], ...] = tuple((r, c) for r in range(GRID) for c in range(GRID))
CELL_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
MAX_OBJECTS = 3
SPLITS = ("train", "heldout", "all")

# Synonyms used by captions / instructions (first entry = canonical word).
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "large": ("large", "big"),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "gray": ("gray", "grey"),
    "white": ("white",),
    "black": ("black",),
    "beige": ("beige",),
}
CELL_WORDS: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("top left", "top-left", "upper left"),
    (0, 1): ("top", "top center", "top middle", "upper middle"),
    (0, 2): ("top right", "top-right", "upper right"),
    (1, 0): ("left", "middle left", "center left"),
    (1, 1): ("center", "middle", "centre"),
    (1, 2): ("right", "middle right", "center right"),
    (2, 0): ("bottom left", "bottom-left", "lower left"),
    (2, 1): ("bottom", "bottom center", "bottom middle", "lower middle"),
    (2, 2): ("bottom right", "bottom-right", "lower right"),
}

RngLike = Union[int, random.Random]


# --------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------

class SceneObject(NamedTuple):
    """One object: ``(shape, colour, size, cell)`` with ``cell = (row, col)``."""

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "cell": list(self.cell)}

    @classmethod
    def from_dict(cls, d: dict) -> "SceneObject":
        return cls(d["shape"], d["colour"], d["size"], tuple(d["cell"]))


@dataclass(frozen=True)
class Scene:
    """Background name plus 1..3 objects in distinct cells.

    Objects are stored sorted by cell, so two scenes with the same content
    compare (and hash) equal regardless of construction order.  Invalid
    scenes raise ``ValueError``.
    """

    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        objs = tuple(sorted((SceneObject(o[0], o[1], o[2], tuple(o[3])) for o in self.objects),
                            key=lambda o: o.cell))
        object.__setattr__(self, "objects", objs)
        _validate(self)

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(d["background"], tuple(SceneObject.from_dict(o) for o in d["objects"]))

    def object_at(self, cell: tuple[int, int]) -> SceneObject | None:
        """The object in ``cell``, or None."""
        return next((o for o in self.objects if o.cell == tuple(cell)), None)

    def replace_objects(self, objects: Sequence[SceneObject]) -> "Scene":
        return Scene(self.background, tuple(objects))


def _validate(scene: Scene) -> None:
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}")
    if not 1 <= len(scene.objects) <= MAX_OBJECTS:
        raise ValueError(f"scene needs 1..{MAX_OBJECTS} objects, got {len(scene.objects)}")
    cells = [o.cell for o in scene.objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a cell: {cells}")
    for o in scene.objects:
        if o.shape not in SHAPES or o.colour not in COLOURS or o.size not in SIZES:
            raise ValueError(f"invalid object {o}")
        if o.cell not in CELLS:
            raise ValueError(f"invalid cell {o.cell}")
        if o.colour == scene.background:
            raise ValueError("object colour equals background colour")


# --------------------------------------------------------------------------
# Held-out split
# --------------------------------------------------------------------------

def _pair_hash(colour: str, shape: str) -> int:
    return zlib.crc32(f"{colour}:{shape}".encode())


def _balanced_held_out() -> frozenset[tuple[str, str]]:
    """One pair per shape, no colour twice (a hash-ranked pick of the 32 pairs put two colours x two shapes
    aside, so those colours only ever came as the other two shapes in training and predicted the shape)."""
    held: list[tuple[str, str]] = []
    for shape in SHAPES:
        free = [c for c in COLOURS if c not in {c for c, _ in held}]
        held.append((min(free, key=lambda c: _pair_hash(c, shape)), shape))
    return frozenset(held)


ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = _balanced_held_out()
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)


def is_held_out(obj: SceneObject | tuple[str, str]) -> bool:
    """True if the object's (colour, shape) pair is reserved for evaluation.

    Accepts a :class:`SceneObject` or a ``(colour, shape)`` tuple.
    """
    pair = (obj.colour, obj.shape) if isinstance(obj, SceneObject) else tuple(obj)
    return pair in HELD_OUT_PAIRS


def scene_in_split(scene: Scene, split: str) -> bool:
    """Whether ``scene`` is allowed in ``split`` ("train", "heldout" or "all")."""
    _check_split(split)
    held = any(is_held_out(o) for o in scene.objects)
    return {"train": not held, "heldout": held, "all": True}[split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------

def as_rng(rng_or_seed: RngLike) -> random.Random:
    """A ``random.Random``: seeds are wrapped, Random instances passed through."""
    if isinstance(rng_or_seed, random.Random):
        return rng_or_seed
    return random.Random(int(rng_or_seed))


def sample_object(rng: random.Random, cell: tuple[int, int], split: str = "train") -> SceneObject:
    """A random object in ``cell``; "heldout" forces a held-out pair, "train" forbids one."""
    _check_split(split)
    pool = {"train": TRAIN_PAIRS, "heldout": sorted(HELD_OUT_PAIRS), "all": ALL_PAIRS}[split]
    colour, shape = rng.choice(pool)
    return SceneObject(shape, colour, rng.choice(SIZES), tuple(cell))


def sample_scene(rng_or_seed: RngLike, n_objects: int | None = None, split: str = "train",
                 background: str | None = None) -> Scene:
    """Deterministic random scene.

    ``n_objects`` defaults to uniform 1..3.  ``split``: "train" (no held-out
    pair), "heldout" (>= 1 held-out pair, the rest unrestricted) or "all".
    """
    _check_split(split)
    rng = as_rng(rng_or_seed)
    n = n_objects if n_objects is not None else rng.randint(1, MAX_OBJECTS)
    bg = background if background is not None else rng.choice(list(BACKGROUNDS))
    cells = rng.sample(CELLS, n)
    rest = "train" if split == "train" else "all"
    objs = [sample_object(rng, cell, split if i == 0 else rest) for i, cell in enumerate(cells)]
    return Scene(bg, tuple(objs))


def sample_captioned(seed: RngLike, split: str = "train") -> tuple[Scene, str]:
    """A ``(scene, caption)`` pair, deterministic from ``seed`` (int or Random)."""
    rng = as_rng(seed)
    scene = sample_scene(rng, split=split)
    return scene, caption(scene, rng)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

def object_geometry(obj: SceneObject, size: int) -> tuple[float, float, float]:
    """``(cx, cy, extent)`` in pixels of ``obj`` on a ``size`` x ``size`` canvas."""
    cell = size / GRID
    r, c = obj.cell
    return (c + 0.5) * cell, (r + 0.5) * cell, SIZE_FRACTION[obj.size] * cell


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float,
               fill) -> None:
    """Draw ``shape`` with bounding-box side ``extent`` centred at ``(cx, cy)``.

    Triangles point up (base = height = extent, centroid ``extent / 6`` below
    the centre); diamonds are squares rotated 45 degrees with diagonal ``extent``.
    """
    h = extent / 2
    box = [round(cx - h), round(cy - h), round(cx + h) - 1, round(cy + h) - 1]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 256, supersample: int = 4) -> Image.Image:
    """RGB image of ``scene``; anti-aliased by drawing at ``supersample`` x and BOX-downsampling."""
    big = size * supersample
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy, ext = object_geometry(obj, big)
        draw_shape(draw, obj.shape, cx, cy, ext, COLOURS[obj.colour])
    if supersample > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return img


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------

def _article(next_word: str) -> str:
    return "an" if next_word[:1].lower() in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def position_phrase(cell: tuple[int, int], rng: random.Random) -> str:
    """Prepositional phrase for a cell, e.g. "in the top left", "on the left"."""
    word = rng.choice(CELL_WORDS[tuple(cell)])
    r, c = cell
    if word in ("left", "right"):
        preps = ["on the", "at the"]
    elif word in ("top", "bottom"):
        preps = ["at the", "along the"]
    else:
        preps = ["in the", "at the"]
    phrase = f"{rng.choice(preps)} {word}"
    if r != 1 and c != 1 and rng.random() < 0.3:
        phrase += " corner"
    return phrase


def _words(obj: SceneObject, rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(SIZE_WORDS[obj.size]), obj.colour, rng.choice(SHAPE_WORDS[obj.shape])


def object_phrase(obj: SceneObject, rng: random.Random, form: str) -> str:
    """One object fully described (size, colour, shape, position) in one of several forms."""
    size, colour, shape = _words(obj, rng)
    if form == "adj":  # a large red circle in the top left
        return f"{_with_article(f'{size} {colour} {shape}')} {position_phrase(obj.cell, rng)}"
    if form == "paren":  # a red circle (large) in the top left
        return f"{_with_article(f'{colour} {shape}')} ({size}) {position_phrase(obj.cell, rng)}"
    if form == "bare":  # a large red circle, top left
        return f"{_with_article(f'{size} {colour} {shape}')}, {rng.choice(CELL_WORDS[obj.cell])}"
    if form == "front":  # in the top left, a large red circle
        return f"{position_phrase(obj.cell, rng)}, {_with_article(f'{size} {colour} {shape}')}"
    raise ValueError(form)


def _join(items: list[str], rng: random.Random) -> str:
    if len(items) == 1:
        return items[0]
    comma = "," if len(items) > 2 and rng.random() < 0.5 else ""
    return ", ".join(items[:-1]) + f"{comma} and {items[-1]}"


def caption(scene: Scene, rng: RngLike) -> str:
    """A varied caption that fully determines ``scene``.

    Every object's size, colour, shape and position and the background colour
    are mentioned (synonyms allowed, see ``*_WORDS``); object order is random.
    """
    rng = as_rng(rng)
    objs = list(scene.objects)
    rng.shuffle(objs)
    bg = rng.choice(BACKGROUND_WORDS[scene.background])
    template = rng.randrange(6)
    if template in (0, 1, 2):
        phrases = [object_phrase(o, rng, rng.choice(["adj", "paren"])) for o in objs]
        listed = _join(phrases, rng)
        return [f"{listed} on a {bg} background",
                f"{bg} background with {listed}",
                f"an image of {listed} against a {bg} background"][template]
    if template == 3:
        phrases = [object_phrase(o, rng, rng.choice(["adj", "paren", "bare"])) for o in objs]
        return "; ".join(phrases) + f"; background: {bg}"
    if template == 4:
        sentences = [f"There is {object_phrase(o, rng, 'adj')}." for o in objs]
        return f"A {bg} background. " + " ".join(sentences)
    phrases = [object_phrase(o, rng, "front") for o in objs]
    return f"{bg} backdrop; " + "; ".join(phrases)


# --------------------------------------------------------------------------
# Editing tasks
# --------------------------------------------------------------------------

EDIT_KINDS: tuple[str, ...] = ("recolour", "move", "add", "remove", "background")


@dataclass(frozen=True)
class EditTask:
    """``target`` is ``source`` with one edit of type ``kind`` described by ``instruction``."""

    source: Scene
    instruction: str
    target: Scene
    kind: str

    def to_dict(self) -> dict:
        return {"source": self.source.to_dict(), "instruction": self.instruction,
                "target": self.target.to_dict(), "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict) -> "EditTask":
        return cls(Scene.from_dict(d["source"]), d["instruction"],
                   Scene.from_dict(d["target"]), d["kind"])


def uniquely_named(scene: Scene) -> list[SceneObject]:
    """Objects whose (colour, shape) occurs once in ``scene`` (safe to refer to by name)."""
    pairs = [(o.colour, o.shape) for o in scene.objects]
    return [o for o in scene.objects if pairs.count((o.colour, o.shape)) == 1]


def _ref(obj: SceneObject, rng: random.Random) -> str:
    return f"the {obj.colour} {rng.choice(SHAPE_WORDS[obj.shape])}"


def _move_phrase(cell: tuple[int, int], rng: random.Random) -> str:
    return f"to the {rng.choice(CELL_WORDS[cell])}"


def _edit_recolour(src: Scene, rng: random.Random) -> tuple[str, Scene] | None:
    cands = uniquely_named(src)
    if not cands:
        return None
    obj = rng.choice(cands)
    new = rng.choice([c for c in COLOURS if c != obj.colour])
    ref = _ref(obj, rng)
    text = rng.choice([f"make {ref} {new}", f"recolour {ref} to {new}", f"turn {ref} {new}",
                       f"change the colour of {ref} to {new}", f"paint {ref} {new}"])
    objs = [o._replace(colour=new) if o == obj else o for o in src.objects]
    return text, src.replace_objects(objs)


def _edit_move(src: Scene, rng: random.Random) -> tuple[str, Scene] | None:
    cands = uniquely_named(src)
    free = [c for c in CELLS if src.object_at(c) is None]
    if not cands or not free:
        return None
    obj, cell = rng.choice(cands), rng.choice(free)
    ref, where = _ref(obj, rng), _move_phrase(cell, rng)
    text = rng.choice([f"move {ref} {where}", f"shift {ref} {where}",
                       f"put {ref} {position_phrase(cell, rng)} instead",
                       f"relocate {ref} {where}"])
    objs = [o._replace(cell=cell) if o == obj else o for o in src.objects]
    return text, src.replace_objects(objs)


def _edit_add(src: Scene, rng: random.Random, split: str) -> tuple[str, Scene] | None:
    free = [c for c in CELLS if src.object_at(c) is None]
    if len(src.objects) >= MAX_OBJECTS or not free:
        return None
    new = sample_object(rng, rng.choice(free), "all" if split == "heldout" else split)
    size, colour, shape = _words(new, rng)
    desc = _with_article(f"{size} {colour} {shape}")
    where = position_phrase(new.cell, rng)
    text = rng.choice([f"add {desc} {where}", f"draw {desc} {where}", f"put {desc} {where}",
                       f"{where}, add {desc}"])
    return text, src.replace_objects(list(src.objects) + [new])


def _edit_remove(src: Scene, rng: random.Random) -> tuple[str, Scene] | None:
    cands = uniquely_named(src)
    if len(src.objects) < 2 or not cands:
        return None
    obj = rng.choice(cands)
    ref = _ref(obj, rng)
    text = rng.choice([f"remove {ref}", f"delete {ref}", f"take away {ref}", f"get rid of {ref}",
                       f"erase {ref}"])
    return text, src.replace_objects([o for o in src.objects if o != obj])


def _edit_background(src: Scene, rng: random.Random) -> tuple[str, Scene] | None:
    new = rng.choice([b for b in BACKGROUNDS if b != src.background])
    word = rng.choice(BACKGROUND_WORDS[new])
    text = rng.choice([f"change the background to {word}", f"make the background {word}",
                       f"use a {word} background", f"switch the background to {word}",
                       f"replace the background with {word}"])
    return text, Scene(new, src.objects)


def _try_edit(rng: random.Random, kind: str, split: str) -> EditTask | None:
    source = sample_scene(rng, split="all")
    if kind == "recolour":
        out = _edit_recolour(source, rng)
    elif kind == "move":
        out = _edit_move(source, rng)
    elif kind == "add":
        out = _edit_add(source, rng, split)
    elif kind == "remove":
        out = _edit_remove(source, rng)
    else:
        out = _edit_background(source, rng)
    if out is None:
        return None
    task = EditTask(source, out[0], out[1], kind)
    return task if _task_in_split([task.source, task.target], split) else None


def _task_in_split(scenes: Sequence[Scene], split: str) -> bool:
    held = any(is_held_out(o) for s in scenes for o in s.objects)
    return {"train": not held, "heldout": held, "all": True}[split]


def sample_edit(seed: RngLike, kind: str | None = None, split: str = "train",
                max_tries: int = 10_000) -> EditTask:
    """Deterministic edit triple.  ``kind`` defaults to uniform over :data:`EDIT_KINDS`.

    Referring expressions ("the red circle") always pick out a unique object.
    split "train": neither source nor target has a held-out pair; "heldout":
    at least one of them has one; "all": unrestricted.
    """
    _check_split(split)
    rng = as_rng(seed)
    kind = kind if kind is not None else rng.choice(EDIT_KINDS)
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}")
    for _ in range(max_tries):
        task = _try_edit(rng, kind, split)
        if task is not None:
            return task
    raise RuntimeError("could not sample an edit task")


# --------------------------------------------------------------------------
# Multi-reference composition
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ComposeTask:
    """Place the single object of each reference image at a named cell.

    ``references[i]`` is "image i+1" in ``instruction``; ``target`` holds the
    same objects (shape, colour, size) moved to the instructed cells on the
    instructed background.  ``references`` is a tuple (hashable).
    """

    references: tuple[Scene, ...]
    instruction: str
    target: Scene

    def to_dict(self) -> dict:
        return {"references": [s.to_dict() for s in self.references],
                "instruction": self.instruction, "target": self.target.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "ComposeTask":
        return cls(tuple(Scene.from_dict(s) for s in d["references"]), d["instruction"],
                   Scene.from_dict(d["target"]))


def _compose_instruction(slots: list[tuple[int, tuple[int, int]]], bg: str,
                         rng: random.Random) -> str:
    t = rng.randrange(4)
    if t == 3:
        parts = [f"image {i + 1} -> {rng.choice(CELL_WORDS[cell])}" for i, cell in slots]
        return f"compose on a {bg} background: " + ", ".join(parts)
    parts = []
    for k, (i, cell) in enumerate(slots):
        noun = "the object" if k == 0 or rng.random() < 0.5 else "the one"
        parts.append(f"{noun} from image {i + 1} {position_phrase(cell, rng)}")
    listed = _join(parts, rng)
    verb = rng.choice(["place", "put", "arrange"])
    if t == 0:
        return f"{verb} {listed} on a {bg} background"
    if t == 1:
        return f"on a {bg} background, {verb} {listed}"
    return f"{verb} {listed}; use a {bg} background"


def sample_compose(seed: RngLike, n_references: int | None = None, split: str = "train",
                   max_tries: int = 10_000) -> ComposeTask:
    """Deterministic composition task with 2 or 3 single-object reference scenes.

    split "train": no held-out pair anywhere; "heldout": at least one reference
    object is a held-out pair; "all": unrestricted.
    """
    _check_split(split)
    rng = as_rng(seed)
    n = n_references if n_references is not None else rng.randint(2, MAX_OBJECTS)
    for _ in range(max_tries):
        refs = tuple(sample_scene(rng, n_objects=1, split="all") for _ in range(n))
        if _task_in_split(refs, split):
            break
    else:
        raise RuntimeError("could not sample a compose task")
    cells = rng.sample(CELLS, n)
    bg = rng.choice(list(BACKGROUNDS))
    target = Scene(bg, tuple(r.objects[0]._replace(cell=c) for r, c in zip(refs, cells)))
    slots = list(enumerate(cells))
    rng.shuffle(slots)
    text = _compose_instruction(slots, rng.choice(BACKGROUND_WORDS[bg]), rng)
    return ComposeTask(refs, text, target)

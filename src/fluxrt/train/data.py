"""Training examples for the embedded default model, drawn from the shapes world.

An `Example` is a prompt, a target scene and 0..3 reference scenes: text-to-image (0 references), an edit
(1 reference: the source image, the prompt is the instruction) or a composition (2-3 references). Everything
is a pure function of (seed, split). `render_dataset` renders the distinct scenes once, in parallel, into a
uint8 array, and indexes examples by the number of references so every training batch has one static shape.
"""

from __future__ import annotations

import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..world import Scene, render, sample_captioned, sample_compose, sample_edit

TASK_MIX = (("t2i", 0.55), ("edit", 0.25), ("compose", 0.20))


@dataclass(frozen=True)
class Example:
    prompt: str
    target: Scene
    refs: tuple[Scene, ...] = ()
    task: str = "t2i"


def sample_example(seed: int, split: str = "train", task: str | None = None) -> Example:
    """One example; the task is drawn from TASK_MIX unless given."""
    rng = random.Random(seed)
    if task is None:
        task = rng.choices([t for t, _ in TASK_MIX], [w for _, w in TASK_MIX])[0]
    sub = rng.randrange(2**31)
    if task == "t2i":
        scene, text = sample_captioned(sub, split=split)
        return Example(text, scene, (), task)
    if task == "edit":
        e = sample_edit(sub, split=split)
        return Example(e.instruction, e.target, (e.source,), task)
    if task == "compose":
        c = sample_compose(sub, split=split)
        return Example(c.instruction, c.target, tuple(c.references), task)
    raise ValueError(f"unknown task {task!r}; expected t2i, edit or compose")


def _render_u8(args) -> np.ndarray:
    scene, size = args
    return np.asarray(render(scene, size), dtype=np.uint8)


@dataclass
class RenderedSet:
    """Distinct scenes rendered once; examples grouped by reference count (0, 1, 2, 3)."""

    images: np.ndarray  # (N, S, S, 3) uint8
    prompts: list[str]
    # groups[n_refs] = (target index (M,), reference indices (M, n_refs), prompt index (M,))
    groups: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]


def render_dataset(examples: list[Example], size: int, workers: int = 1) -> RenderedSet:
    """Render every distinct scene of `examples` once (in `workers` processes)."""
    index: dict[Scene, int] = {}
    for ex in examples:
        for s in (ex.target, *ex.refs):
            index.setdefault(s, len(index))
    scenes = list(index)
    jobs = [(s, size) for s in scenes]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            imgs = list(pool.map(_render_u8, jobs, chunksize=256))
    else:
        imgs = [_render_u8(j) for j in jobs]
    prompts = sorted({ex.prompt for ex in examples})
    pidx = {p: i for i, p in enumerate(prompts)}
    groups = {}
    for n in sorted({len(ex.refs) for ex in examples}):
        exs = [ex for ex in examples if len(ex.refs) == n]
        tgt = np.array([index[ex.target] for ex in exs])
        refs = np.array([[index[r] for r in ex.refs] for ex in exs]).reshape(len(exs), n)
        groups[n] = (tgt, refs, np.array([pidx[ex.prompt] for ex in exs]))
    return RenderedSet(np.stack(imgs), prompts, groups)

"""Deterministic synthetic "shapes world": scenes, renders, captions, edit and
composition tasks (``scene``) and a classic-image-processing parser/scorer
(``evaluate``).  Only numpy and Pillow are required."""

from .evaluate import (ParsedScene, degrade, edit_preserved, evaluate_image, label_components,
                       match_objects, parse_image, score)
from .scene import (BACKGROUNDS, CELL_NAMES, CELLS, COLOURS, EDIT_KINDS, HELD_OUT_PAIRS, SHAPES,
                    SIZES, TRAIN_PAIRS, ComposeTask, EditTask, Scene, SceneObject, caption,
                    is_held_out, render, sample_captioned, sample_compose, sample_edit,
                    sample_scene, scene_in_split)

__all__ = [
    "BACKGROUNDS", "CELL_NAMES", "CELLS", "COLOURS", "EDIT_KINDS", "HELD_OUT_PAIRS", "SHAPES",
    "SIZES", "TRAIN_PAIRS", "ComposeTask", "EditTask", "ParsedScene", "Scene", "SceneObject",
    "caption", "degrade", "edit_preserved", "evaluate_image", "is_held_out", "label_components",
    "match_objects", "parse_image", "render", "sample_captioned", "sample_compose", "sample_edit",
    "sample_scene", "scene_in_split", "score",
]

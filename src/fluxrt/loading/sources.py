"""Find the tensors of one component (flow transformer or VAE) in files, folders and cached repos.

Contract: `find_component(path_or_repo, "transformer" | "vae")` returns a `ComponentSource`: the safetensors
file(s), the key prefix stripped (e.g. `model.diffusion_model.`), the naming scheme of the remaining keys
("bfl" or "diffusers") and a `{name: TensorRef}` index built from the files' JSON headers only, so looking
at a 64 GB checkpoint reads a few kilobytes. Supported: BFL single files (`flux2-dev.safetensors`,
`ae.safetensors`), ComfyUI-prefixed and all-in-one files (other components' keys are ignored), diffusers
pipeline folders (`model_index.json` + `transformer/`, `vae/`), bare component folders (`config.json` +
`diffusion_pytorch_model.safetensors` or shards + `.index.json`) and repo ids in the local hub cache.
Only safetensors is read: pickle formats (.bin/.pt/.pth/.ckpt) are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, ComponentNotFound, listing
from .hub import repo_id_of, resolve

COMPONENTS = ("transformer", "vae")
# Prefixes that wrap a component's keys in ComfyUI / all-in-one files; the longest match wins.
COMPONENT_PREFIXES = {
    "transformer": ("model.diffusion_model.", "diffusion_model.", "transformer."),
    "vae": ("first_stage_model.", "vae."),
}
# Prefixes of components fluxrt loads elsewhere (text encoders); their keys are skipped, not errors.
FOREIGN_PREFIXES = ("text_encoders.", "text_encoder.", "cond_stage_model.", "conditioner.")
_ALL_PREFIXES = sorted((*COMPONENT_PREFIXES["transformer"], *COMPONENT_PREFIXES["vae"], *FOREIGN_PREFIXES),
                       key=len, reverse=True)  # fmt: skip
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, key inside the file, shape, dtype and stored size in bytes."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass
class ComponentSource:
    component: str  # "transformer" | "vae"
    files: tuple[Path, ...]
    prefix: str  # stripped from every key ("" for none)
    key_names: str  # "bfl" | "diffusers"
    tensors: dict[str, TensorRef]  # stripped name -> where it is
    container: str  # "file" | "diffusers" (pipeline folder) | "component-folder" | "folder"
    origin: str  # what the caller passed
    config_json: dict = field(default_factory=dict)  # diffusers config.json next to the weights, if any
    metadata: dict = field(default_factory=dict)  # safetensors __metadata__ of the first file
    ignored: dict = field(default_factory=dict)  # prefix -> number of keys of other components skipped

    @property
    def layout(self) -> str:
        """ "prefixed" if a wrapper prefix was stripped, else the key naming scheme ("bfl" / "diffusers")."""
        return "prefixed" if self.prefix else self.key_names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: r.shape for k, r in self.tensors.items()}

    def hints(self) -> list[str]:
        """Names that may disambiguate presets of equal shapes: the repo id and the file names."""
        repo = repo_id_of(self.files[0]) if self.files else None
        return [h for h in (self.origin, repo, *(f.name for f in self.files)) if h]

    def describe_files(self) -> str:
        return ", ".join(str(f) for f in self.files)


def read_header(path: Path) -> tuple[dict[str, TensorRef], dict]:
    """Parse a safetensors header (u64 little-endian length + JSON) without touching the tensor data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    refs = {}
    for key, h in header.items():
        if h["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {h['dtype']!r}")
        start, end = h["data_offsets"]
        refs[key] = TensorRef(path, key, tuple(h["shape"]), DTYPES[h["dtype"]], end - start)
    return refs, meta


def _check_format(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle-based checkpoints ({path.suffix}) are refused because loading them can run "
            "arbitrary code; convert it to .safetensors first"
        )
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: unsupported checkpoint format {path.suffix!r}; fluxrt reads .safetensors")


def prefix_of(name: str) -> str:
    """The known wrapper prefix `name` starts with (longest match), or ""."""
    return next((p for p in _ALL_PREFIXES if name.startswith(p)), "")


def key_scheme(names, component: str) -> str | None:
    """ "bfl" / "diffusers" if `names` (prefix stripped) hold the component's marker keys, else None."""
    names = set(names)
    if component == "transformer":
        return "bfl" if "img_in.weight" in names else "diffusers" if "x_embedder.weight" in names else None
    if any(n.startswith(("encoder.down.", "decoder.up.")) for n in names):
        return "bfl"
    if any(n.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for n in names):
        return "diffusers"
    return None


def split_components(names) -> dict[str, tuple[str, str]]:
    """{component: (prefix, key scheme)} for every component found in a set of key names."""
    groups: dict[str, list[str]] = {}
    for n in names:
        p = prefix_of(n)
        groups.setdefault(p, []).append(n[len(p) :])
    found = {}
    for comp in COMPONENTS:
        for p in ("", *COMPONENT_PREFIXES[comp]):
            scheme = key_scheme(groups.get(p, ()), comp)
            if scheme and comp not in found:
                found[comp] = (p, scheme)
    return found


def _select(refs: dict[str, TensorRef], prefix: str) -> tuple[dict, dict]:
    """Keys of one component with `prefix` stripped, and a count of the other prefixes' keys."""
    chosen, ignored = {}, {}
    for name, ref in refs.items():
        p = prefix_of(name)
        if p == prefix:
            chosen[name[len(p) :]] = ref
        else:
            ignored[p or "(no prefix)"] = ignored.get(p or "(no prefix)", 0) + 1
    return chosen, ignored


def _from_files(files: list[Path], component: str, container: str, origin: str, weight_map=None, config=None):
    """A ComponentSource over one or several safetensors files (shards merge into one index)."""
    refs, meta = {}, {}
    for f in files:
        _check_format(f)
        r, m = read_header(f)
        meta = meta or m
        refs.update(r if weight_map is None else {k: v for k, v in r.items() if weight_map.get(k) == f.name})
    if weight_map is not None and (lost := sorted(set(weight_map) - set(refs))):
        raise CheckpointError(
            f"{files[0].parent}: index names {len(lost)} keys absent from its shards: {listing(lost)}"
        )
    comps = split_components(refs)
    if component not in comps:
        found = ", ".join(f"{c} ({p or 'no prefix'})" for c, (p, _) in comps.items()) or "no known component"
        raise ComponentNotFound(f"{', '.join(str(f) for f in files)}: no {component} tensors here (found {found})")
    prefix, scheme = comps[component]
    chosen, ignored = _select(refs, prefix)
    return ComponentSource(component, tuple(files), prefix, scheme, chosen, container, origin,
                           config or {}, meta, ignored)  # fmt: skip


def _component_folder(folder: Path, component: str, container: str, origin: str) -> ComponentSource:
    """A diffusers component folder: config.json + one weights file, or shards listed by an index."""
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    index = folder / (DIFFUSERS_WEIGHTS + ".index.json")
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        if missing := [n for n in names if not (folder / n).is_file()]:
            raise CheckpointError(f"{index}: shards missing on disk: {listing(missing)}")
        return _from_files([folder / n for n in names], component, container, origin, weight_map, config)
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return _from_files([folder / DIFFUSERS_WEIGHTS], component, container, origin, None, config)
    st = sorted(folder.glob("*.safetensors"))
    if len(st) == 1:
        return _from_files(st, component, container, origin, None, config)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        _check_format(folder / pickles[0])
    raise CheckpointError(
        f"{folder}: no {DIFFUSERS_WEIGHTS} (or index) for the {component}; found {listing(st) or 'none'}"
    )


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in (".safetensors", ".json") and p.name != "config.json"
                                   for p in folder.iterdir())  # fmt: skip


def _top_level_files(folder: Path, component: str) -> list[Path]:
    """Top-level safetensors files of a folder whose headers hold `component` (BFL repo snapshots)."""
    out = []
    for f in sorted(folder.glob("*.safetensors")):
        refs, _ = read_header(f)
        if component in split_components(refs):
            out.append(f)
    return out


def _pick_file(files: list[Path], component: str, folder: Path, want: str | None) -> Path:
    if len(files) == 1:
        return files[0]
    named = [f for f in files if want and f.name == want]
    if named:
        return named[0]
    raise CheckpointError(
        f"{folder}: several files hold a {component}: {listing(f.name for f in files)}; pass one of them"
    )


def _from_folder(folder: Path, component: str, origin: str, want_file: str | None) -> ComponentSource:
    sub = folder / component
    if (folder / "config.json").is_file() and not (folder / "model_index.json").is_file() and not sub.is_dir():
        return _component_folder(folder, component, "component-folder", origin)
    top = _top_level_files(folder, component)
    if top:  # a BFL file beside (or instead of) a diffusers subfolder: one file, no conversion needed
        return _from_files([_pick_file(top, component, folder, want_file)], component, "folder", origin)
    if _has_weights(sub):
        container = "diffusers" if (folder / "model_index.json").is_file() else "folder"
        return _component_folder(sub, component, container, origin)
    bad = [p for d in (folder, sub) if d.is_dir() for p in sorted(d.iterdir()) if p.suffix.lower() in PICKLE_SUFFIXES]
    if bad:
        _check_format(bad[0])
    raise ComponentNotFound(f"{folder}: found no safetensors {component} (no {component}/ folder, no top-level file)")


def find_component(path_or_repo: str | os.PathLike, component: str, want_file: str | None = None) -> ComponentSource:
    """Locate `component` ("transformer" or "vae") in a file, folder or cached repo id (module docstring)."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    path = resolve(path_or_repo)
    if path.is_file():
        _check_format(path)
        return _from_files([path], component, "file", str(path_or_repo))
    return _from_folder(path, component, str(path_or_repo), want_file)


def find_components(path_or_repo: str | os.PathLike) -> dict[str, ComponentSource]:
    """Every component (transformer, vae) present at a path; raises if there is none."""
    found, errors = {}, []
    for comp in COMPONENTS:
        try:
            found[comp] = find_component(path_or_repo, comp)
        except ComponentNotFound as e:  # other errors (pickle, ambiguity, bad files) propagate
            errors.append(str(e))
    if not found:
        raise ComponentNotFound("; ".join(errors))
    return found

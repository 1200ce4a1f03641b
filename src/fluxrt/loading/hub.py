"""Offline resolution of Hugging Face repo ids to folders of the local hub cache (no network, ever).

Contract: `resolve(path_or_repo)` returns an existing local `Path`. A string that names an existing file or
folder is returned as is; otherwise `org/name` (optionally `org/name@revision`) is looked up in the cache
folder (`$HF_HUB_CACHE`, `$HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`, then
`~/.cache/huggingface/hub`) with the hub's layout: `models--{org}--{name}/refs/{revision}` holds a commit hash
and `snapshots/{hash}/` holds the files. Anything not found raises `CheckpointError` saying where it looked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_cache_dir() -> Path:
    """The hub cache folder the huggingface_hub library would use, from the same environment variables."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text))


def _repo_folder(cache: Path, repo: str) -> Path | None:
    """`models--org--name`, matched exactly first, then case-insensitively (hub ids ignore case)."""
    name = "models--" + repo.replace("/", "--")
    if (cache / name).is_dir():
        return cache / name
    if cache.is_dir():
        for d in cache.iterdir():
            if d.name.lower() == name.lower() and d.is_dir():
                return d
    return None


def snapshot_path(repo_id: str, revision: str = "main", cache: Path | None = None) -> Path:
    """Local snapshot folder of `repo_id` at `revision` (a branch/tag name in refs/, or a commit hash)."""
    cache = cache or hub_cache_dir()
    folder = _repo_folder(cache, repo_id)
    if folder is None:
        raise CheckpointError(
            f"{repo_id!r} is not in the local Hugging Face cache {cache} (no network access is attempted): "
            f"download it first (e.g. `hf download {repo_id}`), set HF_HUB_CACHE, or pass a local path"
        )
    snaps = folder / "snapshots"
    ref = folder / "refs" / revision
    if _COMMIT.match(revision):
        commit = revision
    elif ref.is_file():
        commit = ref.read_text().strip()
    else:
        found = sorted(p.name for p in snaps.iterdir()) if snaps.is_dir() else []
        if revision != "main" or len(found) != 1:
            raise CheckpointError(f"{folder}: no refs/{revision} and snapshots {found or 'none'}; pass @<commit>")
        commit = found[0]
    if not (snaps / commit).is_dir():
        raise CheckpointError(f"{folder}: revision {revision!r} points to {commit}, which has no snapshot folder")
    return snaps / commit


def resolve(path_or_repo: str | os.PathLike) -> Path:
    """An existing local path for a path or a cached repo id (see the module docstring)."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    text = str(path_or_repo)
    m = _REPO_ID.match(text)
    if m is None:
        raise CheckpointError(f"no such file or folder: {text!r} (and it is not an org/name repo id)")
    return snapshot_path(m.group("repo"), m.group("rev") or "main")


def repo_id_of(path: Path) -> str | None:
    """`org/name` if `path` lies inside a hub cache `models--org--name` folder, else None."""
    for part in Path(path).parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--") :].replace("--", "/", 1)
    return None

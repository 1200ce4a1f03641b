"""The one error type of the loading package.

`CheckpointError` is a `ValueError` whose message names the file(s) involved and the offending keys or value,
so a user can fix a bad path or a foreign checkpoint without reading a traceback.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint could not be found, read, recognised or loaded strictly."""


class ComponentNotFound(CheckpointError):
    """The path is readable but holds no tensors of the requested component (transformer / VAE)."""


def listing(keys, limit: int = 12) -> str:
    """'a, b, c ... and 7 more' for error messages."""
    keys = list(keys)
    head = ", ".join(str(k) for k in keys[:limit])
    return head + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")

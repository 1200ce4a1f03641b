"""Saving generated images with provenance metadata, atomically; reading the metadata back.

Contract:
    save_image(image, path, record, fmt=None, overwrite=False) -> Path
        PNG (default), JPEG or WebP, chosen by `fmt` or the path's extension. The file is written to a temporary
        file in the same folder and then moved into place, so a failure never leaves a half-written image; an
        existing file is never replaced unless `overwrite` (the no-clobber move is a hard link, atomic too).
    read_metadata(path) -> dict      the JSON record written by `save_image` (raises MetadataError if none).
    output_paths(out, seeds, fmt) -> [Path]   where `fluxrt generate` writes each image.

Metadata, in every format:
    EXIF Software = "AI generated;flux2" (what the reference writes, marking the image as AI generated) and
    EXIF Make = "Black Forest Labs" for the official FLUX.2 models, but "fluxrt" for any other spec (the embedded
    model was trained here, not by Black Forest Labs, so it must not carry their name).
    The JSON record (model, spec, prompt, seed, steps, guidance, width, height, reference SHA-256 hashes, fluxrt
    version) goes into a PNG tEXt chunk "fluxrt", and for JPEG / WebP into EXIF UserComment (ASCII charset;
    the JSON is written with ASCII escapes, so any prompt survives). No timestamp: the same request writes the
    same bytes.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from .request import FORMATS, RequestError, output_format

SOFTWARE = "AI generated;flux2"
BFL_MAKE = "Black Forest Labs"
FLUXRT_MAKE = "fluxrt"
RECORD_KEY = "fluxrt"  # PNG tEXt keyword
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
USER_COMMENT_ASCII = b"ASCII\x00\x00\x00"  # EXIF UserComment starts with an 8-byte character-code field
QUALITY = 95  # JPEG / WebP quality, the value the reference passes


class MetadataError(ValueError):
    """An image file is missing, unreadable or carries no fluxrt record; the message names the path."""


def format_for(path: str | os.PathLike | None, fmt: str | None = None) -> str:
    """The output format from `fmt`, else from the path's extension, else png; they must agree when both given."""
    suffix = Path(path).suffix.lower() if path is not None else ""
    from_path = SUFFIX_FORMATS.get(suffix)
    if suffix and from_path is None:
        raise RequestError(f"output {str(path)!r}: unknown image extension {suffix!r}; use .png, .jpg or .webp")
    if fmt is None:
        return from_path or "png"
    fmt = output_format(fmt)
    if from_path is not None and from_path != fmt:
        raise RequestError(f"output {str(path)!r} has extension {suffix!r} but the format is {fmt!r}")
    return fmt


def is_folder(out: str | os.PathLike | None) -> bool:
    """Whether an output target names a folder: None (= outputs/), an existing folder, or a trailing slash."""
    return out is None or str(out).endswith(("/", os.sep)) or Path(out).is_dir()


def output_paths(out: str | os.PathLike | None, seeds: list[int], fmt: str) -> list[Path]:
    """One path per image: `out` itself for one image (a file name), `stem_<n>` for several; a folder (existing,
    or written with a trailing slash) or None (= "outputs/") gets `<seed>_<n>.<ext>`."""
    ext = EXTENSIONS[fmt]
    if is_folder(out):
        folder = Path(out or "outputs")
        return [folder / f"{seed}_{n}{ext}" for n, seed in enumerate(seeds)]
    path = Path(out)
    if len(seeds) == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{n}{path.suffix or ext}") for n in range(len(seeds))]


def _make(record: dict) -> str:
    return BFL_MAKE if str(record.get("spec", "")).startswith("flux.2-") else FLUXRT_MAKE


def _exif(record: dict, with_record: bool) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Software] = SOFTWARE
    exif[ExifTags.Base.Make] = _make(record)
    if with_record:
        text = json.dumps(record, ensure_ascii=True, sort_keys=True)
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = USER_COMMENT_ASCII + text.encode("ascii")
    return exif


def encode_image(image: Image.Image, f, fmt: str, record: dict) -> None:
    """Write `image` with its metadata to the binary file object `f`."""
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(RECORD_KEY, json.dumps(record, ensure_ascii=True, sort_keys=True))
        image.save(f, "PNG", pnginfo=info, exif=_exif(record, with_record=False))
    elif fmt == "jpeg":
        image.convert("RGB").save(f, "JPEG", quality=QUALITY, subsampling=0, exif=_exif(record, True))
    elif fmt == "webp":
        image.save(f, "WEBP", quality=QUALITY, exif=_exif(record, True))
    else:
        raise ValueError(f"output_format {fmt!r} is not one of {', '.join(FORMATS)}")


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails with FileExistsError instead of replacing: no check-then-write race
    except FileExistsError:
        raise FileExistsError(f"{path} already exists (pass --overwrite to replace it)") from None
    except OSError:  # a file system without hard links: check, then move
        if path.exists():
            raise FileExistsError(f"{path} already exists (pass --overwrite to replace it)") from None
        os.replace(tmp, path)


def atomic_write(path: str | os.PathLike, write: Callable, overwrite: bool = False) -> Path:
    """Call write(file) on a temporary file beside `path`, then move it into place; nothing is left on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists (pass --overwrite to replace it)")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: the umask applies, as for open()
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_image(image: Image.Image, path: str | os.PathLike, record: dict, fmt: str | None = None,
               overwrite: bool = False, sign: Callable[[bytes, str], bytes] | None = None) -> Path:  # fmt: skip
    """Save atomically with metadata (module docstring); returns the path written.

    `sign(file_bytes, fmt) -> file_bytes` runs last on the encoded file (a C2PA manifest must cover the final bytes).
    """
    fmt = format_for(path, fmt)
    if sign is None:
        return atomic_write(path, lambda f: encode_image(image, f, fmt, record), overwrite)
    buf = io.BytesIO()
    encode_image(image, buf, fmt, record)
    data = sign(buf.getvalue(), fmt)
    return atomic_write(path, lambda f: f.write(data), overwrite)


def _parse(text, path) -> dict:
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetadataError(f"{path}: the fluxrt metadata is not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise MetadataError(f"{path}: the fluxrt metadata is not a JSON object")
    return record


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON record `save_image` wrote into `path` (PNG tEXt "fluxrt", or EXIF UserComment)."""
    if not Path(path).is_file():
        raise MetadataError(f"no such file: {str(path)!r}")
    try:
        with Image.open(path) as im:
            text = im.info.get(RECORD_KEY)
            comment = im.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    except (UnidentifiedImageError, OSError) as e:
        raise MetadataError(f"{str(path)!r} is not a readable image ({e})") from None
    if text is None and isinstance(comment, bytes) and comment.startswith(USER_COMMENT_ASCII):
        text = comment[len(USER_COMMENT_ASCII) :].decode("ascii", errors="replace")
    if text is None:
        raise MetadataError(f"{str(path)!r} carries no fluxrt metadata (was it written by fluxrt?)")
    return _parse(text, path)


def read_exif_tags(path: str | os.PathLike) -> dict:
    """{"Software": ..., "Make": ...} from the EXIF block, for checking provenance tags."""
    with Image.open(path) as im:
        exif = im.getexif()
    return {"Software": exif.get(ExifTags.Base.Software), "Make": exif.get(ExifTags.Base.Make)}

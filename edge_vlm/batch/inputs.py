"""What a batch runs on: image files, folders and manifests turned into :class:`BatchItem`\\ s.

Everything here is checked before the model is loaded, so a typo in a path or a manifest
costs nothing: :class:`BatchInputError` names the input, the line and what to do.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_vlm.errors import EdgeVLMError

#: Extensions picked up from folders. The ones edge-vlm refuses (TIFF, HEIC, ...) are
#: included on purpose: they become error lines that tell the user, instead of vanishing.
IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".gif", ".bmp",
    ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".svg",
})  # fmt: skip
#: Extensions read as manifests when given as an INPUT.
MANIFEST_EXTENSIONS = frozenset({".jsonl", ".ndjson", ".csv"})
#: Manifest fields naming the image, in order of preference.
_IMAGE_FIELDS = ("image", "path", "file", "filename")


class BatchInputError(EdgeVLMError):
    """An input, manifest, prompt or output file of a batch is unusable (a usage error)."""

    exit_code = 2


@dataclass(frozen=True)
class BatchItem:
    """One image of a batch and the prompts asked only of it.

    Attributes:
        path: The image file, as the user named it (relative paths stay relative).
        prompts: Prompts for this image in addition to the batch's prompts.
    """

    path: Path
    prompts: tuple[str, ...] = ()


def discover(inputs: Iterable[str | os.PathLike[str]], *,
             recursive: bool = False) -> list[BatchItem]:
    """Expand files, folders and manifests into the batch's images, in a stable order.

    Folders give their image files (subfolders too with ``recursive``), hidden files
    skipped, in natural order (``img2`` before ``img10``). A ``.jsonl``/``.csv`` file is a
    manifest. Any other file is taken as an image, whatever its name. An image named twice
    is kept once, at its first place, with the prompts of every mention.

    Raises:
        BatchInputError: an input does not exist, or a manifest is malformed.
    """
    found: dict[str, BatchItem] = {}
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            items = [BatchItem(p) for p in _folder_images(path, recursive)]
        elif path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
            items = read_manifest(path)
        elif path.exists():
            items = [BatchItem(path)]
        else:
            raise BatchInputError(f"input '{raw}' does not exist; check the path")
        for item in items:
            key = os.path.abspath(item.path)
            seen = found.get(key)
            if seen is None:
                found[key] = item
            elif item.prompts:
                found[key] = BatchItem(seen.path, _unique((*seen.prompts, *item.prompts)))
    return list(found.values())


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part.lower())
            for part in re.split(r"(\d+)", name) if part]


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=_natural_key)
        if not recursive:
            dirs.clear()
        here = Path(root)
        out.extend(here / name for name in sorted(files, key=_natural_key)
                   if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS)
    return out


def read_manifest(path: Path) -> list[BatchItem]:
    """Read a JSONL or CSV manifest of image paths with optional per-image prompts.

    JSONL: one object a line, ``{"image": "a.png"}``, optionally with ``"prompt": "..."``
    or ``"prompts": [...]`` (a bare ``"a.png"`` string also works). CSV: a header row with
    an ``image`` column and optionally a ``prompt`` column; an image on several rows gets
    every row's prompt. Relative image paths are relative to the manifest's folder.

    Raises:
        BatchInputError: naming the manifest line at fault.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BatchInputError(f"cannot read manifest '{path}': {err}") from None
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    grouped: dict[str, tuple[Path, list[str]]] = {}
    for where, image, prompts in rows:
        if "://" in image or image.startswith("data:"):
            raise BatchInputError(f"{where}: {image[:60]!r} is a URL; edge-vlm batch reads "
                                  "local image files only (download them first)")
        img = Path(image).expanduser()
        img = img if img.is_absolute() else path.parent / img
        entry = grouped.setdefault(os.path.abspath(img), (img, []))
        entry[1].extend(prompts)
    return [BatchItem(p, _unique(prompts)) for p, prompts in grouped.values()]


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, str, list[str]]]:
    rows: list[tuple[str, str, list[str]]] = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise BatchInputError(f"{where}: not valid JSON ({err.msg}); each line must be "
                                  'an object such as {"image": "a.png", "prompt": "..."}') from None
        if isinstance(obj, str):
            obj = {"image": obj}
        if not isinstance(obj, dict):
            raise BatchInputError(f"{where}: expected an object with an \"image\" field, "
                                  f"got {type(obj).__name__}")
        rows.append((where, _image_field(obj, where), _prompt_fields(obj, where)))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[str, str, list[str]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if not any(f in _IMAGE_FIELDS for f in fields):
        raise BatchInputError(f"{path}: the first row must be a header naming an 'image' "
                              f"column (and optionally 'prompt'); got {reader.fieldnames}")
    rows: list[tuple[str, str, list[str]]] = []
    for row in reader:
        obj = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()
               if isinstance(v, str)}
        if not any(obj.values()):
            continue
        where = f"{path} line {reader.line_num}"
        rows.append((where, _image_field(obj, where), _prompt_fields(obj, where)))
    return rows


def _image_field(obj: dict[str, Any], where: str) -> str:
    for name in _IMAGE_FIELDS:
        value = obj.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise BatchInputError(f"{where}: no image path (expected a non-empty \"image\" field)")


def _prompt_fields(obj: dict[str, Any], where: str) -> list[str]:
    prompts: list[str] = []
    single = obj.get("prompt")
    if single is not None and not isinstance(single, str):
        raise BatchInputError(f"{where}: \"prompt\" must be a string")
    if single and single.strip():
        prompts.append(single.strip())
    many = obj.get("prompts")
    if many is not None:
        if not isinstance(many, list) or not all(isinstance(p, str) for p in many):
            raise BatchInputError(f"{where}: \"prompts\" must be a list of strings")
        prompts.extend(p.strip() for p in many if p.strip())
    return prompts


def read_prompts_file(path: str | os.PathLike[str]) -> list[str]:
    """One prompt a line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        BatchInputError: the file cannot be read.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BatchInputError(f"cannot read prompts file '{path}': {err}") from None
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def read_schema_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON schema file: a bare schema, or OpenAI's ``{"name": ..., "schema": {...}}``.

    Raises:
        BatchInputError: the file is missing, not JSON, or not a JSON object.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as err:
        raise BatchInputError(f"cannot read schema file '{path}': {err.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BatchInputError(f"schema file '{path}' is not valid JSON: {err}") from None
    if isinstance(data, dict) and data.get("type") == "json_schema" and "json_schema" in data:
        data = data["json_schema"]  # a whole response_format object
    if isinstance(data, dict) and isinstance(data.get("schema"), dict) and "type" not in data:
        data = data["schema"]
    if not isinstance(data, dict):
        raise BatchInputError(f"schema file '{path}' must hold a JSON object (a JSON schema), "
                              f"got {type(data).__name__}")
    return data


def _unique(prompts: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(prompts))

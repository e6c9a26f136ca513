"""Which files of a hub repository to pull, chosen from its file list as llama.cpp's ``-hf``.

llama.cpp (``common/download.cpp``: ``find_best_model``, ``find_best_sibling``) picks:

- the model: the first ``.gguf`` whose name holds no ``mmproj``/``imatrix``/``mtp-``/...
  and matches ``<QUANT>[.-]`` (case-insensitive), for the asked quantization, else
  ``Q4_K_M`` then ``Q8_0``, else the first model file; of a split model, part 1;
- the mmproj: among ``.gguf`` files with ``mmproj`` in the path, in the model's folder or
  a parent, the one sharing the deepest folder with the model, then whose quantization
  bits (the digits of its tag: ``Q8_0`` → 8, ``F16`` → 16) are closest to the model's.

So a catalog entry needs only the repository and a quantization: no file name to remember.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Tried in order when no quantization is asked for (llama.cpp's defaults).
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")
_NOT_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_SPLIT = re.compile(r"^(.+)-(\d{5})-of-(\d{5})$", re.I)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.I)


@dataclass(frozen=True)
class RepoFile:
    """One file of a repository listing.

    Attributes:
        path: Path inside the repository.
        size: Bytes (0: unknown).
        sha256: The LFS sha256 the hub publishes, when listed.
    """

    path: str
    size: int = 0
    sha256: str | None = None


@dataclass(frozen=True)
class SplitInfo:
    """A GGUF file name's quantization tag and split position (``-00001-of-00003``)."""

    prefix: str
    tag: str
    index: int
    count: int


def split_info(path: str) -> SplitInfo:
    """The quantization tag (upper case, '' if none) and split part of a ``.gguf`` path."""
    if not path.lower().endswith(".gguf"):
        return SplitInfo(path, "", 1, 1)
    prefix = path[: -len(".gguf")]
    index = count = 1
    m = _SPLIT.match(prefix)
    if m:
        prefix, index, count = m.group(1), int(m.group(2)), int(m.group(3))
    t = _TAG.search(prefix)
    return SplitInfo(prefix, t.group(1).upper() if t else "", index, count)


def quant_bits(name: str) -> int:
    """The digits of a quantization tag (``Q4_K_M`` → 4, ``F16`` → 16, none → 0)."""
    m = re.search(r"\d+", name)
    return int(m.group()) if m else 0


def is_model_file(path: str) -> bool:
    """A language-model GGUF (not a projector, imatrix or draft/sidecar model)."""
    name = path.rsplit("/", 1)[-1]
    return name.lower().endswith(".gguf") and not any(k in name for k in _NOT_MODEL)


def find_model(files: list[RepoFile], quant: str | None) -> RepoFile | None:
    """The model file of a quantization (None: llama.cpp's defaults), or None."""
    for tag in [quant] if quant else list(DEFAULT_QUANTS):
        pattern = re.compile(re.escape(tag) + r"[.-]", re.I)
        for f in files:
            if (is_model_file(f.path) and pattern.search(f.path)
                    and split_info(f.path).index == 1):
                return f
    if not quant:
        return next((f for f in files if is_model_file(f.path)
                     and split_info(f.path).index == 1), None)
    return None


def find_mmproj(files: list[RepoFile], model: str) -> RepoFile | None:
    """The vision projector that goes with ``model``, or None if the repository has none."""
    model_dirs = model.split("/")[:-1]
    model_bits = quant_bits(split_info(model).tag)
    best: RepoFile | None = None
    best_key: tuple[int, int] | None = None
    for f in files:
        if not f.path.lower().endswith(".gguf") or "mmproj" not in f.path:
            continue
        dirs = f.path.split("/")[:-1]
        if dirs != model_dirs[: len(dirs)]:
            continue  # not in the model's folder or one of its parents
        key = (-len(dirs), abs(quant_bits(split_info(f.path).tag) - model_bits))
        if best_key is None or key < best_key:
            best, best_key = f, key
    return best


def available_quants(files: list[RepoFile]) -> list[str]:
    """The quantization tags of the model files in a listing, in listing order."""
    seen: dict[str, None] = {}
    for f in files:
        if is_model_file(f.path):
            tag = split_info(f.path).tag
            if tag:
                seen.setdefault(tag, None)
    return list(seen)

"""The catalog of pullable models: ``models/catalog.toml`` plus ``store.catalog_file``."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_vlm.errors import StoreError
from edge_vlm.store.manifest import StoreInputError, check_name

CATALOG_FILE = "catalog.toml"
AUTO = "AUTO"
"""``default = "auto"``: llama.cpp's own choice (Q4_K_M, else Q8_0, else the first model)."""


@dataclass(frozen=True)
class CatalogFile:
    """One downloadable file.

    Attributes:
        file: Path inside the hub repository ('': found from its file list at pull time).
        size: Approximate size in bytes (0: unknown).
        sha256: The expected digest, when the catalog knows it.
        quant: The quantization this file is (empty for the mmproj).
    """

    file: str
    size: int = 0
    sha256: str | None = None
    quant: str = ""

    @property
    def known(self) -> bool:
        """Whether the catalog names the file (else it is found from the repository list)."""
        return bool(self.file)


@dataclass(frozen=True)
class CatalogEntry:
    """A model that can be pulled."""

    name: str
    title: str
    repo: str
    license: str
    parameters: str
    context: int
    default: str
    quants: dict[str, CatalogFile]
    mmproj: CatalogFile
    revision: str = "main"
    layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    notes: str = ""

    def default_file(self) -> CatalogFile:
        """The language-model file of the default quantization."""
        return self.quants[self.default]

    @property
    def from_file_list(self) -> bool:
        """Whether the files are chosen from the repository's file list (no names given)."""
        return not all(f.known for f in (*self.quants.values(), self.mmproj))

    def file_for(self, quant: str | None) -> CatalogFile:
        """The language-model file of a quantization (None: the default).

        For an entry without file names any quantization may be asked for: whether the
        repository has it is known once its file list is read.

        Raises:
            StoreError: the catalog names its files and that quantization is not among them.
        """
        if quant is None:
            return self.default_file()
        found = self.quants.get(quant.upper())
        if found is None:
            if self.from_file_list:
                return CatalogFile("", 0, None, quant.upper())
            raise StoreInputError(
                f"model '{self.name}' has no quantization {quant!r} in the catalog; "
                f"choose one of {', '.join(self.quants)}"
            )
        return found

    def how_to_get(self, name: str | None = None, quant: str | None = None) -> str:
        """The manual way to install this model: what to download from where, and import."""
        name = name or self.name
        file = self.file_for(quant)
        url = f"https://huggingface.co/{self.repo}"
        if file.known and self.mmproj.known:
            return (f"download {file.file} and {self.mmproj.file} from {url}, copy both here, "
                    f"then run: edge-vlm models import {file.file} --mmproj "
                    f"{self.mmproj.file} --name {name}")
        return (f"download the {file.quant} model GGUF and its mmproj GGUF from {url} (see "
                "'Files'), copy both into one folder here, then run: edge-vlm models import "
                f"FOLDER --name {name}")

    def kv_bytes_per_token(self) -> int:
        """f16 K+V bytes per context token (0 if the catalog does not say)."""
        return self.layers * self.kv_heads * self.head_dim * 2 * 2


@dataclass
class Catalog:
    """Entries by name, and the files they came from."""

    entries: dict[str, CatalogEntry] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)

    def get(self, name: str) -> CatalogEntry | None:
        """An entry by (case-insensitive) name, or None."""
        return self.entries.get(name.strip().lower())

    def require(self, name: str) -> CatalogEntry:
        """An entry by name.

        Raises:
            StoreError: not in the catalog; lists what is.
        """
        entry = self.get(name)
        if entry is None:
            raise StoreInputError(
                f"'{name}' is not in the model catalog; see `edge-vlm models catalog` for "
                "what can be pulled, or import files you have with `edge-vlm models import`"
            )
        return entry


def shipped_catalog_path() -> Path:
    """``models/catalog.toml`` of a source checkout, or ``_models`` inside the wheel."""
    from edge_vlm.shipped import models_root

    package = Path(__file__).resolve().parent.parent
    for candidate in (models_root(), package / "_models", package.parent / "models"):
        if (candidate / CATALOG_FILE).is_file():
            return candidate / CATALOG_FILE
    return models_root() / CATALOG_FILE


def load_catalog(extra: Path | str | None = None) -> Catalog:
    """Read the shipped catalog and the extra one.

    Args:
        extra: The extra catalog TOML: the caller's ``settings.store.catalog_file`` (the
            store reads no settings itself). None or "": the shipped catalog only.

    Raises:
        StoreError: a catalog file is unreadable or malformed (naming file and entry).
    """
    catalog = Catalog()
    paths = [shipped_catalog_path()]
    if extra:
        extra_path = Path(extra).expanduser()
        if not extra_path.is_file():
            raise StoreError(f"catalog file {extra_path} (store.catalog_file) does not exist")
        paths.append(extra_path)
    for path in paths:
        if not path.is_file():
            continue
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise StoreError(f"cannot read the model catalog {path}: {err}") from None
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise StoreError(f"model catalog {path}: [models] must be a table")
        for name, raw in models.items():
            entry = _entry(name, raw, path)
            catalog.entries[entry.name] = entry
        catalog.sources.append(path)
    return catalog


def _mb(value: Any, key: str) -> int:
    if not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{key} must be a number of megabytes")
    return int(value * 1_000_000)


def _file(raw: Any, where: str, quant: str = "") -> CatalogFile:
    if not isinstance(raw, dict) or not isinstance(raw.get("file"), str):
        raise ValueError(f"{where} needs a `file` string")
    sha = raw.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
        raise ValueError(f"{where} sha256 must be 64 hex digits")
    size_mb = raw.get("size_mb", 0)
    if not isinstance(size_mb, int | float):
        raise ValueError(f"{where} size_mb must be a number")
    return CatalogFile(raw["file"], int(size_mb * 1_000_000), sha.lower() if sha else None, quant)


def _entry(name: str, raw: Any, path: Path) -> CatalogEntry:
    where = f"model catalog {path}, entry '{name}'"
    try:
        norm = check_name(name)
        if not isinstance(raw, dict):
            raise ValueError("must be a table")
        repo = raw.get("repo")
        if not isinstance(repo, str) or repo.count("/") != 1:
            raise ValueError("`repo` must be 'owner/name'")
        quants_raw = raw.get("quants")
        if quants_raw is None:
            # the usual form: files are chosen from the repository's list at pull time
            if not isinstance(raw.get("default"), str) or not raw["default"]:
                raise ValueError("needs `default` (the quantization to pull, e.g. 'Q4_K_M')")
            default = raw["default"].upper()
            quants = {default: CatalogFile("", _mb(raw.get("size_mb", 0), "size_mb"), None,
                                           default)}
            mmproj = CatalogFile("", _mb(raw.get("mmproj_size_mb", 0), "mmproj_size_mb"))
        else:
            if not isinstance(quants_raw, dict) or not quants_raw:
                raise ValueError("`quants` must map quantizations to files")
            quants = {q.upper(): _file(v, f"quant {q}", q.upper())
                      for q, v in quants_raw.items()}
            default = str(raw.get("default", next(iter(quants)))).upper()
            if default not in quants:
                raise ValueError(f"default quantization {default!r} is not among the quants")
            mmproj = _file(raw.get("mmproj"), "mmproj")
        return CatalogEntry(
            name=norm,
            title=str(raw.get("title", name)),
            repo=repo,
            license=str(raw.get("license", "unknown")),
            parameters=str(raw.get("parameters", "")),
            context=int(raw.get("context", 0)),
            default=default,
            quants=quants,
            mmproj=mmproj,
            revision=str(raw.get("revision", "main")),
            layers=int(raw.get("layers", 0)),
            kv_heads=int(raw.get("kv_heads", 0)),
            head_dim=int(raw.get("head_dim", 0)),
            notes=str(raw.get("notes", "")),
        )
    except (ValueError, TypeError, StoreError) as err:
        raise StoreError(f"{where}: {err}") from None

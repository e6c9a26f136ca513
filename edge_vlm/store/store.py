"""The model store: content-addressed blobs plus one manifest per model.

Layout under ``data_dir()/models`` (``EDGE_VLM_HOME/models``)::

    blobs/sha256-<hex>       the files, stored once each whatever their names
    manifests/<name>.json    one per model (see :class:`~edge_vlm.store.manifest.Manifest`)
    tmp/                     copies in progress (removed when their process is gone)
    .lock                    held while a model is registered or removed

A model becomes visible only when its manifest is renamed into place, after its blobs;
removing deletes the manifest first, then the blobs no other manifest uses. Both happen
under the lock, so concurrent imports, pulls and removals never see or make a half state.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edge_vlm import shipped as _shipped
from edge_vlm.config import data_dir
from edge_vlm.errors import ModelNotFoundError, StoreError
from edge_vlm.fileio import fsync_dir
from edge_vlm.shipped import DEFAULT_NAMES, SHIPPED_MMPROJ_FILE, SHIPPED_MODEL, SHIPPED_MODEL_FILE
from edge_vlm.store.fsutil import (
    LOCK_TIMEOUT_S,
    ProgressSink,
    StagedFile,
    atomic_write_json,
    hash_file,
    remove_orphans,
    store_lock,
)
from edge_vlm.store.manifest import (
    ROLE_MMPROJ,
    ROLE_MODEL,
    FileEntry,
    Manifest,
    StoreInputError,
    check_name,
)

SHIPPED_HASHES = "SHA256SUMS"
"""Optional file beside the shipped model listing ``<sha256>  <file name>`` lines."""


@dataclass(frozen=True)
class VerifyResult:
    """The state of one file after :meth:`Store.verify`.

    Attributes:
        name: Model name.
        role: ``model`` or ``mmproj``.
        path: Where the file is.
        status: ``ok``, ``missing``, ``changed`` or ``unchecked`` (no recorded hash).
        detail: What differs, for a person.
    """

    name: str
    role: str
    path: Path
    status: str
    detail: str = ""


class LoadCheck(Protocol):
    """Loads a pair once where a crash cannot hurt (the runtime's child-process check,
    :func:`edge_vlm.preflight.probe.probe_pair`); returns what it measured."""

    def __call__(self, model: Path, mmproj: Path, *, timeout: float,
                 names: tuple[str, str] | None = None) -> Any: ...


class Store:
    """The model store rooted at ``root``.

    The front ends open it from the settings with :func:`edge_vlm.preflight.open_store`
    and pass it down; the store itself reads no settings.

    Args:
        root: The store's folder (``data_dir()/models``).
        verify_on_load: Re-hash a model's files when it is looked up for loading.
        catalog_file: An extra catalog TOML, for the "pull it" hint of a missing name.
        load_check: Check-loads a pair before it is installed (None: installing with
            ``check_load`` is refused).
        check_load_timeout_s: Longest that check may take.
    """

    def __init__(self, root: Path, *, verify_on_load: bool = False,
                 catalog_file: str | None = None, load_check: LoadCheck | None = None,
                 check_load_timeout_s: float = 600.0) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"
        self.tmp = root / "tmp"
        self.lock_path = root / ".lock"
        self.verify_on_load = verify_on_load
        self.catalog_file = catalog_file
        self.load_check = load_check
        self.check_load_timeout_s = check_load_timeout_s

    @classmethod
    def default(cls) -> Store:
        """The store of this user (``EDGE_VLM_HOME`` or the platform data dir) with default
        options and no load check (use :func:`edge_vlm.preflight.open_store` to honour
        ``settings.store``)."""
        return cls(data_dir() / "models")

    # -- paths ----------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        """Where the blob of a digest lives."""
        return self.blobs / f"sha256-{sha256}"

    def manifest_path(self, name: str) -> Path:
        """Where the manifest of a (normalised) name lives."""
        return self.manifests / f"{name}.json"

    def path_of(self, entry: FileEntry) -> Path:
        """The file of a manifest entry: its blob, or the file referenced in place."""
        return Path(entry.path) if entry.path else self.blob_path(entry.sha256)

    def paths(self, m: Manifest) -> tuple[Path, Path]:
        """(model, mmproj) files of a model, checked to exist.

        Raises:
            ModelNotFoundError: a file went missing; says how to repair.
        """
        out = []
        for role in (ROLE_MODEL, ROLE_MMPROJ):
            entry = m.file(role)
            p = self.path_of(entry)
            if not p.is_file():
                where = f"'{p}' (referenced in place)" if entry.path else f"blob '{p}'"
                raise ModelNotFoundError(
                    f"model '{m.name}': its {role} file {where} is missing; re-import it "
                    f"(edge-vlm models rm {m.name}, then edge-vlm models import ...)"
                )
            out.append(p)
        return out[0], out[1]

    @contextlib.contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the store lock (writers only; readers rely on atomic renames)."""
        with store_lock(self.lock_path, timeout=timeout):
            yield

    # -- reading --------------------------------------------------------------------------

    def _read(self, path: Path) -> Manifest:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"model manifest {path} cannot be read ({err}); delete it") from None
        if not isinstance(raw, dict):
            raise StoreError(f"model manifest {path} is damaged; delete it")
        m = Manifest.from_dict(raw, path)
        if m.name != path.stem:
            raise StoreError(f"model manifest {path} names '{m.name}'; delete or rename it")
        return m

    def find_installed(self, name: str) -> Manifest | None:
        """The manifest of an installed (not shipped) model, or None."""
        path = self.manifest_path(name)
        return self._read(path) if path.is_file() else None

    def find(self, name: str) -> Manifest | None:
        """An installed model, or the shipped one by its name or ``default``."""
        norm = name.strip().lower()
        if norm in DEFAULT_NAMES:
            return self.shipped()
        try:
            norm = check_name(norm)
        except StoreError:
            return None
        return self.find_installed(norm)

    def get(self, name: str) -> Manifest:
        """Like :meth:`find`, raising when absent.

        Raises:
            ModelNotFoundError: with what to do.
        """
        m = self.find(name)
        if m is None:
            raise ModelNotFoundError(_not_installed(name, self.catalog_file))
        return m

    def installed(self) -> tuple[list[Manifest], list[str]]:
        """All installed models by name, and messages about manifests that cannot be read."""
        models: list[Manifest] = []
        problems: list[str] = []
        if self.manifests.is_dir():
            for path in sorted(self.manifests.glob("*.json")):
                try:
                    models.append(self._read(path))
                except StoreError as err:
                    problems.append(str(err))
        return models, problems

    def names(self) -> list[str]:
        """Names of the installed models, sorted (unreadable manifests left out)."""
        return sorted({m.name for m in self.installed()[0]})

    def shipped(self) -> Manifest | None:
        """The shipped default model as a manifest (not stored; None if absent)."""
        from edge_vlm.gguf.reader import read_gguf
        from edge_vlm.store.manifest import facts_from

        folder = _shipped.shipped_model_dir()
        model, mmproj = folder / SHIPPED_MODEL_FILE, folder / SHIPPED_MMPROJ_FILE
        if not model.is_file() or not mmproj.is_file():
            return None
        try:
            facts = facts_from(read_gguf(model), read_gguf(mmproj))
        except Exception:  # a broken shipped model is reported when it is loaded
            from edge_vlm.store.manifest import ModelFacts

            facts = ModelFacts()
        sums = _read_sums(folder / SHIPPED_HASHES)
        files = [
            FileEntry(role, sums.get(p.name, ""), p.stat().st_size, p.name, str(p))
            for role, p in ((ROLE_MODEL, model), (ROLE_MMPROJ, mmproj))
        ]
        return Manifest(
            name=SHIPPED_MODEL, files=files, source={"kind": "shipped", "from": str(folder)},
            license="MIT", facts=facts, validated=None, added="", last_used=None, shipped=True,
        )

    def lookup(self, name: str) -> tuple[Path, Path] | None:
        """(model, mmproj) of an installed model by name, marking it used; None if unknown.

        Raises:
            ModelNotFoundError: the name is a catalog model that is not installed, or a
                file of the model went missing.
            StoreError: ``verify_on_load`` is set and a file changed.
        """
        found = self.lookup_manifest(name)
        return None if found is None else self.paths(found)

    def lookup_manifest(self, name: str) -> Manifest | None:
        """Like :meth:`lookup`, returning the manifest (its files' sha256 included)."""
        try:
            norm = check_name(name)
        except StoreError:
            return None
        m = self.find_installed(norm)
        if m is None:
            hint = _catalog_hint(norm, self.catalog_file)
            if hint:
                raise ModelNotFoundError(hint)
            return None
        self.paths(m)  # both files are there, or say which is not
        if self.verify_on_load:
            bad = [r for r in self.verify([m.name]) if r.status != "ok"]
            if bad:
                raise StoreError(f"model '{m.name}': {bad[0].role} file {bad[0].path} "
                                 f"{bad[0].status} ({bad[0].detail}); re-import it")
        self.touch(norm)
        return m

    def touch(self, name: str) -> None:
        """Record that a model was used now (skipped if the store is busy or read-only)."""
        from edge_vlm.store.manifest import now_iso

        try:
            with self.lock(timeout=2.0):
                m = self.find_installed(name)
                if m is not None:
                    m.last_used = now_iso()
                    atomic_write_json(self.manifest_path(name), m.to_dict())
        except (OSError, StoreError):
            pass

    # -- writing --------------------------------------------------------------------------

    def register(self, m: Manifest, staged: dict[str, StagedFile | None]) -> tuple[Manifest, bool]:
        """Move staged files into blobs and write the manifest, under the lock.

        Returns:
            The manifest now installed and whether it is new (False: the same files were
            already installed under this name).

        Raises:
            StoreError: the name is taken by a model with other files.
        """
        with self.lock():
            remove_orphans(self.tmp)
            existing = self.find_installed(m.name)
            if existing is not None:
                if _same_files(existing, m):
                    return existing, False
                raise StoreInputError(_name_taken(existing))
            self.blobs.mkdir(parents=True, exist_ok=True)
            for entry in m.files:
                st = staged.get(entry.role)
                if st is None or entry.path is not None:
                    continue
                dest = self.blob_path(entry.sha256)
                if dest.is_file() and dest.stat().st_size == entry.size:
                    continue  # the same content is already stored (another model)
                os.replace(st.path, dest)
                if not st.linked:
                    with contextlib.suppress(OSError):
                        dest.chmod(0o444)  # a copy we own: guard it against edits
            fsync_dir(self.blobs)
            atomic_write_json(self.manifest_path(m.name), m.to_dict())
            return m, True

    def remove(self, name: str) -> int:
        """Uninstall a model; returns the bytes freed (blobs shared with others stay).

        Raises:
            ModelNotFoundError: no such model.
            StoreError: it is the shipped model.
        """
        if name.strip().lower() in DEFAULT_NAMES:
            raise StoreInputError(
                f"'{name}' is the model shipped with edge-vlm: it cannot be removed")
        norm = check_name(name)
        with self.lock():
            path = self.manifest_path(norm)
            if not path.is_file():
                raise ModelNotFoundError(_not_installed(name, self.catalog_file))
            path.unlink()
            fsync_dir(self.manifests)
            return self._collect_garbage()

    def gc(self) -> int:
        """Delete unreferenced blobs and left-over copies; returns the bytes freed."""
        with self.lock():
            remove_orphans(self.tmp)
            return self._collect_garbage()

    def _collect_garbage(self) -> int:
        models, problems = self.installed()
        if problems:
            return 0  # a damaged manifest may reference blobs: keep them all
        used = {f.sha256 for m in models for f in m.files if f.path is None}
        freed = 0
        if self.blobs.is_dir():
            for blob in self.blobs.iterdir():
                sha = blob.name.removeprefix("sha256-")
                if blob.name.startswith("sha256-") and sha not in used:
                    with contextlib.suppress(OSError):
                        size = blob.stat().st_size
                        blob.unlink()
                        freed += size
            fsync_dir(self.blobs)
        return freed

    def unreferenced_bytes(self) -> int:
        """Bytes of blobs no manifest uses (left by an interrupted registration)."""
        models, _ = self.installed()
        used = {f.sha256 for m in models for f in m.files}
        total = 0
        if self.blobs.is_dir():
            for blob in self.blobs.iterdir():
                if blob.name.removeprefix("sha256-") not in used:
                    with contextlib.suppress(OSError):
                        total += blob.stat().st_size
        return total

    # -- checking -------------------------------------------------------------------------

    def verify(self, names: list[str] | None = None,
               progress: ProgressSink | None = None) -> list[VerifyResult]:
        """Re-hash the files of some (default: all installed) models.

        Raises:
            ModelNotFoundError: a named model is not installed.
        """
        if names:
            models = [self.get(n) for n in names]
        else:
            models, _ = self.installed()
        results = []
        for m in models:
            for entry in m.files:
                p = self.path_of(entry)
                label = f"{m.name} {entry.role}"
                if not p.is_file():
                    results.append(VerifyResult(m.name, entry.role, p, "missing",
                                                "the file is gone"))
                    continue
                if not entry.sha256:
                    why = (f"no {SHIPPED_HASHES} beside the shipped model" if m.shipped
                           else "no recorded sha256")
                    results.append(VerifyResult(m.name, entry.role, p, "unchecked", why))
                    continue
                sha, size = hash_file(p, progress, label)
                if sha != entry.sha256 or size != entry.size:
                    results.append(VerifyResult(
                        m.name, entry.role, p, "changed",
                        f"sha256 {sha[:12]}... ({size} bytes), recorded "
                        f"{entry.sha256[:12]}... ({entry.size} bytes)"))
                else:
                    results.append(VerifyResult(m.name, entry.role, p, "ok"))
        return results


def blob_digest(path: Path) -> str:
    """The sha256 a store blob is named after (its content's, checked when it was stored),
    or "" for any other file."""
    name = path.name
    if path.parent.name == "blobs" and name.startswith("sha256-") and len(name) == 71:
        digest = name.removeprefix("sha256-")
        if all(c in "0123456789abcdef" for c in digest):
            return digest
    return ""


def _same_files(a: Manifest, b: Manifest) -> bool:
    return {(f.role, f.sha256) for f in a.files} == {(f.role, f.sha256) for f in b.files}


def _name_taken(existing: Manifest) -> str:
    return (
        f"a different model named '{existing.name}' is already installed; choose another "
        f"name with --name, or remove it first: edge-vlm models rm {existing.name}"
    )


def _not_installed(name: str, catalog_file: str | None) -> str:
    return _catalog_hint(name, catalog_file) or (
        f"no model named '{name}' is installed (see edge-vlm models list); "
        "install one with edge-vlm models import MODEL.gguf --mmproj MMPROJ.gguf"
    )


def _catalog_hint(name: str, catalog_file: str | None) -> str:
    try:
        from edge_vlm.store.catalog import load_catalog

        entry = load_catalog(catalog_file).get(name)
    except Exception:  # the hint is a courtesy: a catalog problem must not break lookups
        return ""
    if entry is None:
        return ""
    return (
        f"model '{name}' is not installed: pull it with `edge-vlm models pull {name}` "
        f"(needs network), or on a machine with network {entry.how_to_get(name)}"
    )


def _read_sums(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and len(parts[0]) == 64:
                out[parts[1].lstrip("*")] = parts[0].lower()
    return out

"""Which model files a batch answers with, by content: the SHA-256 of the model and mmproj.

The digests make the resume key (results stay resumable when the model is copied or moved)
and, on Ray, make every replica prove it loads the driver's files: a model named from the
store is looked up by name on each worker and its files hashed against the digests the
driver's store recorded; a model given by path is hashed on the driver and on each worker.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_vlm.batch.keys import model_key
from edge_vlm.errors import ModelMismatchError
from edge_vlm.resolve import resolve_model
from edge_vlm.store.fsutil import hash_file

if TYPE_CHECKING:
    from edge_vlm.store.store import Store


@dataclass(frozen=True)
class ModelFiles:
    """A model pair and its content digests.

    Attributes:
        name: The name to load it by (a store name or ``default``), or the model's path.
        mmproj: The mmproj path for a model given by path (None for a named model).
        model_path: The model file on the driver.
        mmproj_path: The mmproj file on the driver.
        model_sha256: SHA-256 of the model file.
        mmproj_sha256: SHA-256 of the mmproj file.
        by_name: True when workers resolve ``name`` in their own model store.
    """

    name: str
    mmproj: str | None
    model_path: Path
    mmproj_path: Path
    model_sha256: str
    mmproj_sha256: str
    by_name: bool

    @property
    def key(self) -> str:
        """The model part of every resume key."""
        return model_key(self.model_sha256, self.mmproj_sha256)


def identify(model: str | Path, mmproj: str | Path | None = None, *,
             store: Store | None = None) -> ModelFiles:
    """Resolve a model as :func:`edge_vlm.load` would and find its files' digests: the
    store's recorded SHA-256 for a named model, else the files hashed here.

    Args:
        model: A store name, ``default`` or a GGUF path.
        mmproj: The mmproj of a model given by path.
        store: The model store (the caller opens it from its settings with
            :func:`edge_vlm.preflight.open_store`; None: the default store).

    Raises:
        ModelNotFoundError: the model cannot be found.
    """
    text = str(model)
    if store is None:
        from edge_vlm.store.store import Store

        store = Store.default()
    ref = resolve_model(text, mmproj, store=store)
    # resolve_model reads a *.gguf or existing path as a path and anything else as a name.
    as_path = Path(text).expanduser()
    by_name = mmproj is None and not (as_path.suffix.lower() == ".gguf" or as_path.exists())
    model_sha, mmproj_sha = recorded_digests(ref.name, ref.model, ref.mmproj, store)
    return ModelFiles(
        name=text, mmproj=None if mmproj is None else str(mmproj),
        model_path=ref.model, mmproj_path=ref.mmproj,
        model_sha256=model_sha or hash_file(ref.model)[0],
        mmproj_sha256=mmproj_sha or hash_file(ref.mmproj)[0],
        by_name=by_name,
    )


def recorded_digests(name: str, model: Path, mmproj: Path, store: Store) -> tuple[str, str]:
    """The SHA-256 ``store`` recorded for these two files ("" where it has none: a model
    loaded by path, or a shipped model without its SHA256SUMS)."""
    from edge_vlm.errors import StoreError
    from edge_vlm.store.manifest import ROLE_MMPROJ, ROLE_MODEL

    try:
        manifest = store.find(name)
    except StoreError:
        manifest = None
    if manifest is None:
        return "", ""
    found = []
    for role, path in ((ROLE_MODEL, model), (ROLE_MMPROJ, mmproj)):
        entry = manifest.file(role)
        same = store.path_of(entry).resolve() == path.resolve()
        found.append(entry.sha256 if same else "")
    return found[0], found[1]


def verify(files: ModelFiles, store: Store | None = None) -> tuple[str, str | None]:
    """On a worker: find the model as the driver named it (in ``store``, opened from the
    settings the worker loads with; None: the default store) and check both files'
    SHA-256 against the driver's; returns the (model, mmproj) arguments to load it with.

    Raises:
        ModelNotFoundError: the model is not installed on this node (or the path is absent).
        ModelMismatchError: a file differs from the driver's.
    """
    ref = resolve_model(files.name, files.mmproj, store=store)
    for role, path, want in (("model", ref.model, files.model_sha256),
                             ("mmproj", ref.mmproj, files.mmproj_sha256)):
        got, _ = hash_file(path)
        if got != want:
            raise ModelMismatchError(
                f"{role} file '{path}' on node {socket.gethostname()} has sha256 {got[:16]}..., "
                f"but the driver's has {want[:16]}...: every node must hold the same model "
                f"files (install '{files.name}' the same way on each node)")
    return files.name, files.mmproj

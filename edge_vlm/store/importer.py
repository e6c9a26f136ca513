"""Importing a model pair into the store: find, check, copy (or link) while hashing, check
the copy, load it once in a child process, register.

Nothing is registered until every step passed; an interruption at any point leaves at most
a staging file in ``tmp/`` (removed by the next writer) or an unreferenced blob (reused or
removed later), never a visible half model.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from edge_vlm.errors import ModelLoadError, ModelMismatchError, StoreError
from edge_vlm.gguf.reader import GGUFInfo, read_gguf
from edge_vlm.gguf.validate import (
    mmproj_output_width,
    text_embedding_width,
    validate_mmproj,
    validate_text_model,
)
from edge_vlm.shipped import DEFAULT_NAMES
from edge_vlm.store.fsutil import ProgressSink, StagedFile, hash_file
from edge_vlm.store.manifest import (
    ROLE_MMPROJ,
    ROLE_MODEL,
    FileEntry,
    Manifest,
    StoreInputError,
    check_name,
    facts_from,
    slug,
)
from edge_vlm.store.store import Store, _name_taken


class ChecksumError(StoreError):
    """A file's sha256 is not the expected one (:attr:`role` says which file)."""

    def __init__(self, message: str, role: str) -> None:
        super().__init__(message)
        self.role = role


LinkMode = Literal["copy", "link", "link_or_copy"]
"""``copy``; ``link``: hard link, else use in place; ``link_or_copy``: hard link, else copy."""


def _is_mmproj(info: GGUFInfo) -> bool:
    return info.architecture == "clip" or any(k.startswith("clip.") for k in info.metadata)


def find_pair(folder: Path) -> tuple[Path, Path]:
    """The language model and mmproj GGUF files of a folder.

    The mmproj is the GGUF whose architecture is ``clip``; the model is the other one.

    Raises:
        StoreError: no GGUF, no mmproj or no model, or several candidates (all listed).
    """
    ggufs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if not ggufs:
        raise StoreInputError(
            f"no .gguf files in '{folder}': pass the model file and --mmproj")
    models: list[Path] = []
    projs: list[Path] = []
    unreadable: list[str] = []
    for p in ggufs:
        try:
            info = read_gguf(p)
        except ModelLoadError as err:
            unreadable.append(f"{p.name} ({err})")
            continue
        (projs if _is_mmproj(info) else models).append(p)
    skipped = f"; unreadable: {'; '.join(unreadable)}" if unreadable else ""
    if len(projs) != 1 or len(models) != 1:
        def names(ps: list[Path]) -> str:
            return ", ".join(p.name for p in ps) or "none"

        which = "mmproj" if len(projs) != 1 else "language model"
        raise StoreInputError(
            f"cannot tell the pair in '{folder}': {which} candidates are "
            f"{names(projs if which == 'mmproj' else models)} (models: {names(models)}; "
            f"mmproj files: {names(projs)}){skipped}; name them: edge-vlm models import "
            "MODEL.gguf --mmproj MMPROJ.gguf"
        )
    return models[0], projs[0]


def check_pair(model: Path, mmproj: Path, shown: tuple[str, str] | None = None
               ) -> tuple[GGUFInfo, GGUFInfo]:
    """Validate both headers (bounded parser) and the pairing, without llama.cpp.

    Raises:
        ModelLoadError: a file is not a valid GGUF of its role.
        ModelMismatchError: the mmproj's output width differs from the model's width.
    """
    shown_model, shown_proj = shown or (str(model), str(mmproj))
    info = read_gguf(model)
    validate_text_model(info, shown_model)
    proj = read_gguf(mmproj)
    validate_mmproj(proj, shown_proj)
    width_model, width_proj = text_embedding_width(info), mmproj_output_width(proj)
    if width_model and width_proj and width_model != width_proj:
        raise ModelMismatchError(
            f"mmproj '{shown_proj}' projects to {width_proj} dims but model '{shown_model}' "
            f"expects {width_model}: they are from different models; use the mmproj "
            "published with this model"
        )
    return info, proj


def _source_file(path: Path, role: str) -> Path:
    p = path.expanduser()
    if not p.exists():
        raise StoreInputError(f"{role} file '{p}' does not exist")
    if not p.is_file():
        raise StoreInputError(f"{role} path '{p}' is not a file")
    return p.resolve()


def import_pair(
    store: Store,
    model: Path,
    mmproj: Path,
    *,
    name: str | None = None,
    link: LinkMode = "copy",
    check_load: bool = True,
    check_timeout: float = 600.0,
    progress: ProgressSink | None = None,
    source: dict[str, Any] | None = None,
    licence: str | None = None,
    expected: dict[str, str] | None = None,
) -> tuple[Manifest, bool]:
    """Install a model pair.

    Args:
        store: The store.
        model: Language-model GGUF.
        mmproj: Vision projector GGUF.
        name: Store name (default: from the model file name).
        link: How the files get into the store (see :data:`LinkMode`).
        check_load: Load the pair once in a child process before registering (with
            ``store.load_check``).
        check_timeout: Seconds the child may take.
        progress: Receives copy / hash progress.
        source: Recorded as the manifest's ``source`` (default: an import record).
        licence: Licence identifier (default: the model's ``general.license``).
        expected: sha256 per role that the files must have (a pull's hub hashes).

    Returns:
        The installed manifest, and whether it is new (False: already installed).

    Raises:
        StoreError, ModelLoadError, ModelMismatchError: nothing was installed.
    """
    src = {ROLE_MODEL: _source_file(model, "model"), ROLE_MMPROJ: _source_file(mmproj, "mmproj")}
    shown = (str(model), str(mmproj))
    info, proj = check_pair(src[ROLE_MODEL], src[ROLE_MMPROJ], shown)
    from edge_vlm.sandbox import check_gguf_template

    check_gguf_template(info.metadata, shown[0])  # a hostile chat template is refused here
    facts = facts_from(info, proj)
    final = check_name(name) if name else check_name(slug(src[ROLE_MODEL].stem))
    if final in DEFAULT_NAMES:
        raise StoreInputError(f"'{final}' names the shipped model; choose another --name")
    existing = store.find_installed(final)
    if existing is not None and any(
        existing.file(role).size != src[role].stat().st_size for role in src
    ):
        raise StoreInputError(_name_taken(existing))  # before copying gigabytes

    with contextlib.ExitStack() as stack:
        staged: dict[str, StagedFile | None] = {}
        entries: list[FileEntry] = []
        for role in (ROLE_MODEL, ROLE_MMPROJ):
            path = src[role]
            label = f"{role} {(model if role == ROLE_MODEL else mmproj).name}"
            st = stack.enter_context(StagedFile(store.tmp))
            ref: str | None = None
            if link == "copy" or not st.adopt_link(path, progress, label):
                if link == "link":
                    st.close()
                    staged[role] = None
                    sha, size = hash_file(path, progress, label)
                    ref = str(path)
                else:
                    st.fill_from(path, progress, label)
            if ref is None:
                staged[role] = st
                sha, size = st.sha256, st.size
            want = (expected or {}).get(role)
            if want and want != sha:
                shown_name = (model if role == ROLE_MODEL else mmproj).name
                raise ChecksumError(
                    f"checksum mismatch for {role} file '{shown_name}': expected sha256 {want}, "
                    f"got {sha}; the file is damaged or not the published one; nothing was "
                    "installed", role)
            given = model if role == ROLE_MODEL else mmproj  # its name, not a resolved blob's
            entries.append(FileEntry(role, sha, size, given.name, ref))

        if existing is not None:
            candidate = {(e.role, e.sha256) for e in entries}
            if candidate == {(f.role, f.sha256) for f in existing.files}:
                return existing, False
            raise StoreInputError(_name_taken(existing))

        # Check what will be stored, not what was read before: the source may have changed.
        stored = {r: (s.path if s is not None else src[r]) for r, s in staged.items()}
        try:
            check_pair(stored[ROLE_MODEL], stored[ROLE_MMPROJ], shown)
        except ModelLoadError as err:
            raise StoreError(f"the files changed while they were imported: {err}") from None
        validated = None
        if check_load:
            if store.load_check is None:
                raise StoreError(
                    "this store was opened without a load check: open it with "
                    "edge_vlm.preflight.open_store(settings), or pass check_load=False")
            result = store.load_check(stored[ROLE_MODEL], stored[ROLE_MMPROJ],
                                      timeout=check_timeout, names=shown)
            validated = asdict(result)
        manifest = Manifest(
            name=final,
            files=entries,
            source=source or {
                "kind": "import",
                "from": {ROLE_MODEL: str(src[ROLE_MODEL]), ROLE_MMPROJ: str(src[ROLE_MMPROJ])},
                "link": link,
                "host": _host(),
            },
            license=licence or facts.license or None,
            facts=facts,
            validated=validated,
        )
        return store.register(manifest, staged)
    raise AssertionError("unreachable")  # pragma: no cover - for type checkers


def _host() -> str:
    try:
        return os.uname().nodename
    except AttributeError:  # Windows
        import platform

        return platform.node()

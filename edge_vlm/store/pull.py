"""``models pull``: download a catalog model through huggingface_hub, verify, install.

A catalog entry names a repository and a quantization; the two files are chosen from the
repository's file list the way llama.cpp's ``-hf`` chooses them (:mod:`.repofiles`), so no
file name has to be remembered. Entries that do name their files are pulled by those names.

huggingface_hub does the transfer: its cache (``HF_HOME`` / ``HF_HUB_CACHE``), resuming a
broken transfer, ``HF_ENDPOINT`` mirrors, ``HF_HUB_OFFLINE`` and tokens from its usual
places. Each file is then checked against the catalog's sha256, or else the sha256 the hub
publishes for LFS files (the ``X-Linked-Etag`` that names the cached blob), while it is
hard-linked (or copied) into the store. Nothing is registered unless both files match.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from edge_vlm.errors import StoreError
from edge_vlm.store.catalog import AUTO, CatalogEntry, CatalogFile
from edge_vlm.store.fsutil import ProgressSink
from edge_vlm.store.manifest import (
    ROLE_MMPROJ,
    ROLE_MODEL,
    Manifest,
    StoreInputError,
    check_name,
)
from edge_vlm.store.repofiles import (
    RepoFile,
    available_quants,
    find_mmproj,
    find_model,
    quant_bits,
    split_info,
)
from edge_vlm.store.store import Store

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_ENDPOINT = "https://huggingface.co"


class NoNetworkError(StoreError):
    """The hub cannot be reached (or ``HF_HUB_OFFLINE`` is set) and the file is not cached."""


def installed_name(entry: CatalogEntry, quant: str | None) -> str:
    """The store name of a pull: the catalog name, suffixed for a non-default quantization."""
    file = entry.file_for(quant)
    return entry.name if file.quant == entry.default else f"{entry.name}-{file.quant.lower()}"


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the endpoint opens (True behind a proxy: cannot tell).

    Without this, huggingface_hub retries a refused connection for ~25 s before failing.
    """
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                       "http_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _cache_dir() -> str | None:
    """huggingface_hub's cache, read now (the library reads its variables once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _no_network(entry: CatalogEntry, quant: str | None, name: str,
                why: str) -> NoNetworkError:
    return NoNetworkError(
        f"cannot pull '{entry.name}': {why}. On a machine with network (or there: "
        f"`edge-vlm models pull {entry.name}`), {entry.how_to_get(name, quant)}"
    )


def list_files(entry: CatalogEntry, quant: str | None, name: str) -> tuple[list[RepoFile], str]:
    """The files of an entry's repository: from the hub, else from the local HF cache.

    Returns:
        The files and where the list came from (the hub URL, or the cache folder).

    Raises:
        NoNetworkError: no network and nothing cached for this repository.
        StoreError: the repository or revision does not exist, or is gated.
    """
    offline = _offline()
    if not offline and _reachable(_endpoint()):
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
        from huggingface_hub.hf_api import RepoFile as HubFile

        try:
            tree = list(HfApi(endpoint=_endpoint()).list_repo_tree(
                entry.repo, revision=entry.revision, recursive=True))
        except GatedRepoError as err:
            raise _gated(entry) from err
        except RevisionNotFoundError as err:
            raise StoreError(f"{entry.repo} has no revision '{entry.revision}' "
                             "(the catalog entry is out of date)") from err
        except RepositoryNotFoundError as err:
            raise StoreError(f"repository {entry.repo} not found on {_endpoint()} (private, "
                             "renamed, or the catalog entry is wrong)") from err
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else "?"
            raise StoreError(f"listing the files of {entry.repo} failed: the hub answered "
                             f"HTTP {status}") from err
        except Exception as err:
            if _is_connection_error(err):
                raise _no_network(entry, quant, name,
                                  f"no network connection to {_endpoint()}") from err
            raise
        files = [RepoFile(t.path, int(t.size or 0), t.lfs.sha256 if t.lfs else None)
                 for t in tree if isinstance(t, HubFile)]
        return sorted(files, key=lambda f: f.path), f"{_endpoint()}/{entry.repo}"
    cached = _cached_files(entry)
    if cached is not None:
        return cached
    why = ("HF_HUB_OFFLINE is set and the repository is not in the Hugging Face cache"
           if offline else f"no network connection to {_endpoint()}")
    raise _no_network(entry, quant, name, why)


def _cached_files(entry: CatalogEntry) -> tuple[list[RepoFile], str] | None:
    """The files of the cached snapshot of the entry's revision (offline pulls), or None."""
    from huggingface_hub import constants

    cache = Path(_cache_dir() or constants.HF_HUB_CACHE)
    repo_dir = cache / ("models--" + entry.repo.replace("/", "--"))
    ref = repo_dir / "refs" / entry.revision
    try:
        commit = ref.read_text().strip() if ref.is_file() else entry.revision
    except OSError:
        return None
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    files = [RepoFile(p.relative_to(snapshot).as_posix(), p.stat().st_size)
             for p in sorted(snapshot.rglob("*")) if p.is_file()]
    return files, str(snapshot)


def choose_files(entry: CatalogEntry, quant: str | None, files: list[RepoFile],
                 where: str) -> tuple[CatalogFile, CatalogFile, dict[str, str]]:
    """The model and mmproj files to pull, chosen from a repository list as llama.cpp does.

    Returns:
        The two files, and the sha256 the listing publishes for them (by file name).

    Raises:
        StoreError: no model file of that quantization (listing those there are), or no
            mmproj in the repository.
    """
    want = (quant or entry.default).upper()
    model = find_model(files, None if want == AUTO else want)
    if model is None:
        have = available_quants(files)
        raise StoreInputError(
            f"{entry.repo} has no {want} model file ({where}); quantizations there: "
            f"{', '.join(have) or 'none (no GGUF model files)'}"
            + (f"; pull one with: edge-vlm models pull {entry.name} --quant {have[0]}"
               if have else ""))
    if split_info(model.path).count > 1:
        raise StoreError(f"{entry.repo}'s {want} model is split into "
                         f"{split_info(model.path).count} files; the model store takes "
                         "single-file models: choose another --quant")
    mmproj = find_mmproj(files, model.path)
    if mmproj is None:
        raise StoreError(f"{entry.repo} has no mmproj file (no vision projector) next to "
                         f"{model.path}: it cannot answer about images, so edge-vlm cannot "
                         "use it")
    listed = {f.path: f.sha256 for f in (model, mmproj) if f.sha256}
    tag = split_info(model.path).tag
    chosen = want if want != AUTO else (tag if quant_bits(tag) else AUTO)
    return (CatalogFile(model.path, model.size, None, chosen),
            CatalogFile(mmproj.path, mmproj.size), listed)


def _gated(entry: CatalogEntry) -> StoreError:
    return StoreError(
        f"{entry.repo} is gated: accept its licence on {DEFAULT_ENDPOINT}/{entry.repo}, "
        "then log in (`hf auth login`) or set HF_TOKEN, and pull again"
    )


def _download(entry: CatalogEntry, file: CatalogFile, name: str,
              quant: str | None) -> tuple[Path, str | None, str | None]:
    """Fetch one file; returns (local path, hub sha256 or None, commit or None)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{entry.repo}/{file.file}"
    offline = _offline()
    unreachable = not offline and not _reachable(_endpoint())
    try:
        path = Path(hf_hub_download(
            repo_id=entry.repo, filename=file.file, revision=entry.revision,
            endpoint=_endpoint(), cache_dir=_cache_dir(),
            local_files_only=offline or unreachable,  # a cached copy still serves
        ))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        why = ("HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache"
               if offline else f"no network connection to {_endpoint()}")
        raise _no_network(entry, quant, name, why) from err
    except GatedRepoError as err:
        raise _gated(entry) from err
    except RevisionNotFoundError as err:
        raise StoreError(f"{entry.repo} has no revision '{entry.revision}' "
                         "(the catalog entry is out of date)") from err
    except RemoteEntryNotFoundError as err:
        raise StoreError(f"{where} does not exist on the hub (the catalog entry is out of "
                         "date: fix its file name in the catalog, or leave file names out "
                         "and let pull choose from the repository's file list)") from err
    except RepositoryNotFoundError as err:
        raise StoreError(f"repository {entry.repo} not found on {_endpoint()} (private, "
                         "renamed, or the catalog entry is wrong)") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise StoreError(f"downloading {where} failed: the hub answered HTTP {status}") from err
    except OSError as err:
        if _is_connection_error(err):
            raise _no_network(entry, quant, name,
                              f"no network connection to {_endpoint()}") from err
        raise StoreError(f"downloading {where} failed: {err}; run the pull again") from err
    except Exception as err:
        if _is_connection_error(err):
            raise _no_network(entry, quant, name,
                              f"no network connection to {_endpoint()}") from err
        raise
    blob = path.resolve()
    hub_sha = blob.name if _SHA256.match(blob.name) and blob.parent.name == "blobs" else None
    parts = path.parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else None
    return path, hub_sha, commit


def _is_connection_error(err: BaseException) -> bool:
    e: BaseException | None = err
    while e is not None:
        if type(e).__name__ in {"ConnectError", "ConnectTimeout", "ConnectionError",
                                "OfflineModeIsEnabled"} or isinstance(e, ConnectionError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _forget_cached(path: Path) -> None:
    """Remove a damaged download from the Hugging Face cache (its pointer and its blob)."""
    with contextlib.suppress(OSError):
        blob = path.resolve()
        path.unlink()
        if blob != path:
            blob.unlink()


def pull(
    store: Store,
    entry: CatalogEntry,
    *,
    quant: str | None = None,
    name: str | None = None,
    check_load: bool = True,
    check_timeout: float = 600.0,
    progress: ProgressSink | None = None,
) -> tuple[Manifest, bool, list[str]]:
    """Download, verify and install a catalog model.

    Returns:
        The manifest, whether it is newly installed, and notes for the user (e.g. a file
        that could not be verified because the hub published no sha256 for it).

    Raises:
        NoNetworkError: one line saying so and how to import copied files instead.
        StoreError: download, checksum or install failure; nothing was registered.
    """
    from edge_vlm.store.importer import ChecksumError, import_pair

    file = entry.file_for(quant)
    final = check_name(name) if name else installed_name(entry, quant)
    existing = store.find_installed(final)
    same_source = existing is not None and existing.source.get("repo") == entry.repo
    listed: dict[str, str] = {}
    if entry.from_file_list:
        if same_source and existing is not None and existing.source.get("asked") == file.quant:
            return existing, False, []
        files, where = list_files(entry, quant, final)
        file, mmproj, listed = choose_files(entry, quant, files, where)
    else:
        mmproj = entry.mmproj
        if same_source and existing is not None and {
            f.filename for f in existing.files
        } == {file.file, mmproj.file}:
            return existing, False, []
    paths: dict[str, Path] = {}
    expected: dict[str, str] = {}
    commits: set[str] = set()
    notes: list[str] = []
    for role, cf in ((ROLE_MODEL, file), (ROLE_MMPROJ, mmproj)):
        path, hub_sha, commit = _download(entry, cf, final, quant)
        paths[role] = path
        if commit:
            commits.add(commit)
        if cf.sha256 and hub_sha and cf.sha256 != hub_sha:
            notes.append(f"the catalog's sha256 for {cf.file} differs from the hub's; "
                         "checking against the catalog's")
        want = cf.sha256 or listed.get(cf.file) or hub_sha
        if want:
            expected[role] = want
        else:
            notes.append(f"{cf.file}: the hub published no sha256 and the catalog has none; "
                         "its hash was recorded but not checked")
    source: dict[str, Any] = {
        "kind": "pull",
        "endpoint": _endpoint(),
        "repo": entry.repo,
        "revision": entry.revision,
        "commit": sorted(commits)[0] if len(commits) == 1 else sorted(commits),
        "files": {ROLE_MODEL: file.file, ROLE_MMPROJ: mmproj.file},
        "quant": file.quant,
        "asked": (quant or entry.default).upper(),
        "catalog": entry.name,
    }
    try:
        manifest, new = import_pair(
            store, paths[ROLE_MODEL], paths[ROLE_MMPROJ], name=final, link="link_or_copy",
            check_load=check_load, check_timeout=check_timeout, progress=progress,
            source=source, licence=entry.license, expected=expected,
        )
    except ChecksumError as err:
        _forget_cached(paths[err.role])
        raise StoreError(err.message + "; the damaged download was removed from the "
                         "Hugging Face cache, pull again") from None
    return manifest, new, notes

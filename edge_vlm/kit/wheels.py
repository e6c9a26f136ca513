"""The wheels of a kit: llama-cpp-python repacked as installed, edge-vlm, their dependencies.

llama-cpp-python is published as source only: installing it compiles llama.cpp with the
CMake flags of that moment (``CMAKE_ARGS``: Metal, CUDA, ...). A kit must carry *that*
build, so it is repacked from the installed files listed in its ``RECORD`` (each checked
against the hash recorded at install time), under the tag its ``WHEEL`` file declares. pip's
cached wheel is not used: pip keys that cache by the source archive, not by ``CMAKE_ARGS``,
so after a rebuild with other flags the cache can hold a different build than the one
installed. Repacking never compiles anything (a few seconds for ~25 MB).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edge_vlm.errors import EdgeVLMError

#: dist-info files an installer writes: not part of a wheel.
_INSTALLER_FILES = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}
_GLIBC_SYMBOL = re.compile(rb"GLIBC_2\.(\d+)(?:\.\d+)?\x00")
_BACKEND_LIB = re.compile(r"(?:^|/)(?:lib)?ggml-([a-z0-9]+)\.(?:so|dylib|dll)$", re.I)


class KitBuildError(EdgeVLMError):
    """A kit cannot be built; the message says why and what to do."""


class KitUsageError(KitBuildError):
    """The build was asked for something impossible (bad version, existing folder)."""

    exit_code = 2


@dataclass(frozen=True)
class Wheel:
    """A wheel written into a kit.

    Attributes:
        path: The file.
        name: Distribution name as published (``llama_cpp_python``).
        version: Its version.
        tags: The wheel tags it declares (``py3-none-linux_x86_64``).
    """

    path: Path
    name: str
    version: str
    tags: tuple[str, ...]


def _record_hash(data_hash: str) -> str:
    return "sha256=" + base64.urlsafe_b64encode(bytes.fromhex(data_hash)).rstrip(b"=").decode()


def _dist_info_dir(dist: metadata.Distribution) -> str:
    for f in dist.files or []:
        if f.parts[-1] == "METADATA" and f.parts[0].endswith(".dist-info"):
            return f.parts[0]
    raise KitBuildError(f"the installed {dist.metadata['Name']} has no dist-info METADATA "
                        "in its RECORD; reinstall it")


def is_editable(dist: metadata.Distribution) -> bool:
    """Whether a distribution is an editable (``pip install -e``) install."""
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    try:
        return bool(json.loads(text).get("dir_info", {}).get("editable"))
    except ValueError:
        return False


def wheel_tags(dist: metadata.Distribution) -> tuple[str, ...]:
    """The ``Tag:`` lines of an installed distribution's ``WHEEL`` file."""
    text = dist.read_text("WHEEL") or ""
    tags = tuple(line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("Tag:"))
    if not tags:
        raise KitBuildError(f"the installed {dist.metadata['Name']} has no wheel tag in its "
                            "WHEEL file (was it installed by pip?); reinstall it with pip")
    return tags


def _compressed_tag(tags: tuple[str, ...]) -> str:
    parts = [sorted({t.split("-")[i] for t in tags}) for i in range(3)]
    return "-".join(".".join(p) for p in parts)


def repack_installed(name: str, out_dir: Path,
                     on_bytes: Callable[[int], None] | None = None) -> Wheel:
    """Write an installed distribution back into a wheel, from its ``RECORD``.

    Every file is checked against the hash recorded when it was installed; byte-compiled
    files and what the installer added (``INSTALLER``, ``direct_url.json``, console
    scripts, which pip makes again from ``entry_points.txt``) are left out.

    Raises:
        KitBuildError: not installed, editable, modified since install, or installs files
            outside site-packages that cannot go back into a wheel.
    """
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise KitBuildError(f"{name} is not installed in this Python ({sys.executable}): "
                            f"install it, then build the kit again") from None
    if is_editable(dist):
        raise KitBuildError(f"{name} is an editable install here; it cannot be repacked "
                            "into a wheel")
    dist_name = dist.metadata["Name"]
    version = dist.version
    tags = wheel_tags(dist)
    info_dir = _dist_info_dir(dist)
    scripts = Path(sysconfig.get_path("scripts")).resolve()
    members: list[tuple[str, Path, str | None]] = []
    for f in dist.files or []:
        rel = f.as_posix()
        if "__pycache__" in f.parts or rel.endswith(".pyc"):
            continue
        if f.parts[0] == info_dir and f.parts[-1] in _INSTALLER_FILES and len(f.parts) == 2:
            continue
        path = Path(str(dist.locate_file(f))).resolve()
        if f.parts[0] == "..":
            if path.parent == scripts:
                continue  # a console script: pip writes it again from entry_points.txt
            raise KitBuildError(f"the installed {dist_name} has a file outside site-packages "
                                f"({path}) that cannot be put back into a wheel")
        want = f.hash.value if f.hash is not None and f.hash.mode == "sha256" else None
        members.append((rel, path, want))
    base = re.sub(r"[-_.]+", "_", dist_name)
    wheel_name = f"{base}-{version}-{_compressed_tag(tags)}.whl"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel_name
    partial = out_dir / f".{wheel_name}.partial"
    record_rows: list[tuple[str, str, str]] = []
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            # dist-info last, as the wheel spec recommends (RECORD at the very end)
            for rel, path, want in sorted(members, key=lambda m: (m[0].startswith(info_dir),
                                                                  m[0])):
                try:
                    data = path.read_bytes()
                except OSError as err:
                    raise KitBuildError(f"the installed {dist_name} is missing {path} "
                                        f"({err.strerror}); reinstall it") from None
                digest = hashlib.sha256(data).digest()
                if want is not None and base64.urlsafe_b64encode(digest).rstrip(b"=").decode(
                        ) != want:
                    raise KitBuildError(
                        f"the installed {dist_name} was modified after install: {path} does "
                        "not match the hash in its RECORD; reinstall it (it is not what the "
                        "kit would claim to carry)")
                info = zipfile.ZipInfo.from_file(path, rel)
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
                record_rows.append((rel, _record_hash(digest.hex()), str(len(data))))
                if on_bytes is not None:
                    on_bytes(len(data))
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerows(record_rows)
            writer.writerow((f"{info_dir}/RECORD", "", ""))
            zf.writestr(f"{info_dir}/RECORD", buf.getvalue())
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return Wheel(target, base, version, tags)


def repack_size(name: str) -> int:
    """Bytes :func:`repack_installed` will read (for a progress bar)."""
    dist = metadata.distribution(name)
    return sum(f.size or 0 for f in dist.files or []
               if "__pycache__" not in f.parts and f.parts[0] != "..")


def glibc_needed(wheel: Path) -> str:
    """The newest ``GLIBC_2.x`` symbol version the shared libraries of a wheel need ("")."""
    best = -1
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if ".so" not in name.rsplit("/", 1)[-1]:
                continue
            for m in _GLIBC_SYMBOL.finditer(zf.read(name)):
                best = max(best, int(m.group(1)))
    return f"2.{best}" if best >= 0 else ""


def backends(wheel: Path) -> list[str]:
    """llama.cpp's compute backends in a llama-cpp-python wheel, from its ggml libraries."""
    found = set()
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            m = _BACKEND_LIB.search(name)
            if m and m.group(1).lower() != "base":
                found.add(m.group(1).upper() if len(m.group(1)) <= 4 else m.group(1).title())
    return sorted(found, key=lambda b: (b != "CPU", b))


def source_tree() -> Path | None:
    """The edge-vlm source checkout this code runs from, or None (installed from a wheel)."""
    root = Path(__file__).resolve().parent.parent.parent
    pyproject = root / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return None
    return root if re.search(r'^name\s*=\s*"edge-vlm"', text, re.M) else None


def run_pip(args: list[str], on_line: Callable[[str], None] | None = None) -> None:
    """Run ``python -m pip ARGS`` of this Python, passing each output line to ``on_line``.

    Raises:
        KitBuildError: pip failed; the message carries its last lines.
    """
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            tail = [*tail[-14:], line]
            if on_line is not None:
                on_line(line)
    if proc.wait() != 0:
        raise KitBuildError("pip failed (" + " ".join(cmd[3:5]) + "): " + "\n".join(tail))


def build_edge_wheel(out_dir: Path, on_line: Callable[[str], None] | None = None) -> Path:
    """The edge-vlm wheel: built from the source checkout, else repacked as installed.

    Raises:
        KitBuildError: the build failed.
    """
    src = source_tree()
    if src is None:
        return repack_installed("edge-vlm", out_dir).path
    before = set(out_dir.glob("edge_vlm-*.whl"))
    run_pip(["wheel", "--no-deps", "--wheel-dir", str(out_dir), str(src)], on_line)
    made = sorted(set(out_dir.glob("edge_vlm-*.whl")) - before) or sorted(
        out_dir.glob("edge_vlm-*.whl"))
    if not made:
        raise KitBuildError(f"pip built no edge-vlm wheel from {src}")
    return made[-1]


def installed_constraints() -> str:
    """``name==version`` of every distribution in this Python except edge-vlm itself.

    Used as pip constraints so that the kit carries the versions this install runs with.
    """
    seen: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        norm = re.sub(r"[-_.]+", "-", name).lower()
        if norm != "edge-vlm" and not is_editable(dist):
            seen.setdefault(norm, dist.version)
    return "".join(f"{n}=={v}\n" for n, v in sorted(seen.items()))

"""Install edge-vlm from an offline kit: check, then venv, wheels, models, self-check.

This file travels inside every kit as ``install.py`` (``install.sh`` and ``install.ps1`` only
find a Python and run it), so it uses the standard library alone and parses on old Pythons
(3.8+): a machine with the wrong Python must get a clear refusal, not a SyntaxError. The
same code checks a kit for ``edge-vlm kit verify``.

Order matters: everything that can refuse the kit (its ``kit.json`` against this machine,
then every file against ``SHA256SUMS``) runs before anything is created.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

KIT_JSON = "kit.json"
SUMS = "SHA256SUMS"
FORMAT = 1
#: Files an operating system drops into folders it is shown (a Mac writing to a FAT stick,
#: Windows Explorer): never part of a kit, never a reason to refuse one.
OS_JUNK = (".DS_Store", "Thumbs.db", "desktop.ini")
_CHUNK = 1 << 20

# Exit codes of install.py (and so of install.sh / install.ps1).
EXIT_OK = 0
EXIT_FAILED = 1          # an install step failed
EXIT_REFUSED = 2         # the kit does not fit this machine, or is not intact


class KitError(Exception):
    """A kit cannot be used; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# -- integrity ----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        chunk = f.read(_CHUNK)
        while chunk:
            h.update(chunk)
            chunk = f.read(_CHUNK)
    return h.hexdigest()


def is_os_junk(rel: str) -> bool:
    """Whether a kit-relative path is a file an OS adds by itself (``._x``, ``.DS_Store``)."""
    name = rel.rsplit("/", 1)[-1]
    return name in OS_JUNK or name.startswith("._")


def kit_files(root: Path) -> list[str]:
    """Every file under a kit folder, as sorted ``/``-separated relative paths (no SUMS)."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != SUMS:
                out.append(rel)
    return sorted(out)


def read_sums(root: Path) -> dict[str, str]:
    """``SHA256SUMS`` of a kit as {relative path: sha256}.

    Raises:
        KitError: the file is missing or a line is not ``<sha256>  <path>``.
    """
    path = root / SUMS
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise KitError(f"{path} cannot be read ({err.strerror or err}): this folder is not a "
                       "complete edge-vlm kit (an interrupted build or copy?); copy the kit "
                       "again") from None
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        rel = rel.lstrip("*")
        if not sep or len(digest) != 64 or not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise KitError(f"{path} line {n} is not '<sha256>  <path>': {line[:80]!r}; the "
                           "kit is damaged, copy it again")
        sums[rel] = digest.lower()
    return sums


class Integrity:
    """What ``SHA256SUMS`` says against what is on disk.

    Attributes:
        checked: Files listed and hashed.
        changed: Listed files whose content differs.
        missing: Listed files that are gone.
        extra: Files present but not listed (OS junk excluded).
        junk: OS junk files found and ignored.
    """

    def __init__(self) -> None:
        self.checked: list[str] = []
        self.changed: list[str] = []
        self.missing: list[str] = []
        self.extra: list[str] = []
        self.junk: list[str] = []

    @property
    def intact(self) -> bool:
        """True when nothing changed, nothing is missing and nothing was added."""
        return not (self.changed or self.missing or self.extra)

    def lines(self) -> list[str]:
        """One line per problem, for a person."""
        return ([f"CHANGED: {r}" for r in self.changed] + [f"MISSING: {r}" for r in self.missing]
                + [f"EXTRA (not in {SUMS}): {r}" for r in self.extra])


def check_integrity(root: Path, on_file: Any | None = None) -> Integrity:
    """Re-hash every file of a kit against its ``SHA256SUMS``.

    Args:
        root: The kit folder.
        on_file: Called with (relative path, size) after each file is hashed (progress).

    Raises:
        KitError: ``SHA256SUMS`` is missing or malformed.
    """
    sums = read_sums(root)
    result = Integrity()
    present = set()
    for rel in kit_files(root):
        if is_os_junk(rel) and rel not in sums:
            result.junk.append(rel)
            continue
        present.add(rel)
        if rel not in sums:
            result.extra.append(rel)
    for rel, digest in sorted(sums.items()):
        if rel not in present:
            result.missing.append(rel)
            continue
        path = root / rel
        result.checked.append(rel)
        if sha256_file(path) != digest:
            result.changed.append(rel)
        if on_file is not None:
            on_file(rel, path.stat().st_size)
    return result


# -- this machine against the kit ---------------------------------------------------------


def _norm_machine(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_facts() -> dict[str, Any]:
    """Python version, OS, CPU architecture and C library of this machine."""
    libc, libc_version = "", ""
    if sys.platform.startswith("linux"):
        name, version = platform.libc_ver()
        libc = "glibc" if name == "glibc" else (name or "musl")
        libc_version = version if name == "glibc" else ""
    mac = platform.mac_ver()[0] if sys.platform == "darwin" else ""
    return {
        "python": "{}.{}".format(*sys.version_info[:2]),
        "implementation": sys.implementation.name,
        "system": platform.system(),
        "machine": _norm_machine(platform.machine()),
        "libc": libc,
        "libc_version": libc_version,
        "macos": mac,
    }


def version_tuple(text: str) -> tuple[int, ...]:
    """``2.36`` as (2, 36); non-digits ignored."""
    parts = []
    for p in text.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def compatibility_problems(kit: dict[str, Any], host: dict[str, Any]) -> list[str]:
    """Why a kit cannot be installed on a machine ([] when it can)."""
    problems = []
    plat = kit.get("platform", {})
    want_sys, want_machine = plat.get("system", "?"), _norm_machine(plat.get("machine", "?"))
    if (want_sys, want_machine) != (host["system"], host["machine"]):
        problems.append(
            f"this kit is for {want_sys} {want_machine} (its llama.cpp was built there), but "
            f"this machine is {host['system']} {host['machine']}: build a kit on a "
            f"{host['system']} {host['machine']} machine with `edge-vlm kit build`")
    elif want_sys == "Linux" and plat.get("libc"):
        if host["libc"] != plat["libc"]:
            problems.append(f"this kit needs {plat['libc']} but this Linux uses "
                            f"{host['libc'] or 'another C library'}: build the kit on a "
                            "machine with the same C library")
        elif plat.get("libc_version") and version_tuple(host["libc_version"]) < version_tuple(
                plat["libc_version"]):
            problems.append(f"this kit needs glibc {plat['libc_version']} or newer (its "
                            f"llama.cpp was compiled against it); this machine has "
                            f"{host['libc_version']}: build the kit on a machine whose "
                            "Linux is as old as this one or older")
    elif want_sys == "Darwin" and plat.get("macos") and version_tuple(
            host["macos"] or "0") < version_tuple(plat["macos"]):
        problems.append(f"this kit needs macOS {plat['macos']} or newer; this Mac runs "
                        f"{host['macos']}")
    pythons = kit.get("python", [])
    if host["implementation"] != kit.get("implementation", "cpython"):
        problems.append(f"this kit is for CPython, not {host['implementation']}")
    elif kit.get("python_min") and version_tuple(host["python"]) < version_tuple(
            kit["python_min"]):
        problems.append(
            f"edge-vlm needs Python {kit['python_min']} or newer and this kit is for Python "
            f"{' or '.join(pythons) or '?'}, but the Python running it ({sys.executable}) is "
            f"{host['python']}: install Python {pythons[0] if pythons else kit['python_min']} "
            "and run install.sh --python /path/to/it")
    elif host["python"] not in pythons:
        problems.append(
            f"this kit is for Python {' or '.join(pythons) or '?'}, but the Python running "
            f"it ({sys.executable}) is {host['python']}: run the installer with one of those "
            f"(install.sh --python /path/to/python{pythons[0] if pythons else '3'}), or build "
            f"a kit for {host['python']} with `edge-vlm kit build --python {host['python']}`")
    return problems


def read_kit(root: Path) -> dict[str, Any]:
    """A kit's ``kit.json``.

    Raises:
        KitError: missing, unreadable, or of a format this installer does not know.
    """
    path = root / KIT_JSON
    try:
        kit = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise KitError(f"{path} cannot be read ({err.strerror or err}): this folder is not a "
                       "complete edge-vlm kit (an interrupted build or copy?)") from None
    except ValueError as err:
        raise KitError(f"{path} is not valid JSON ({err}): the kit is damaged, copy it "
                       "again") from None
    if not isinstance(kit, dict) or kit.get("format") != FORMAT:
        raise KitError(f"{path} is not an edge-vlm kit manifest of format {FORMAT}: "
                       "install it with the install.sh that came with it")
    return kit


def check_kit(root: Path, quiet: bool = False,
              prefix: Path | None = None) -> dict[str, Any]:
    """Everything that can refuse a kit, before anything is touched.

    Args:
        root: The kit folder.
        quiet: Do not print what is being checked.
        prefix: The venv to install into, checked to be new, empty or a venv.

    Returns:
        The kit manifest.

    Raises:
        KitError: naming every problem found.
    """
    kit = read_kit(root)
    problems = compatibility_problems(kit, host_facts())
    if problems:
        raise KitError("refusing to install: " + "; ".join(problems))
    if prefix is not None:
        check_prefix(prefix)
    if not quiet:
        _say(f"checking {len(read_sums(root))} files against {SUMS} ...")
    integrity = check_integrity(root)
    if not integrity.intact:
        raise KitError("refusing to install: the kit is not intact ("
                       + "; ".join(integrity.lines())
                       + "): copy it again from the machine that built it, or check it "
                         "there with `edge-vlm kit verify`")
    return kit


# -- installing ---------------------------------------------------------------------------


def default_prefix() -> Path:
    """The per-user venv location: ``venv`` in edge-vlm's data dir (as platformdirs has it)."""
    home = Path.home()
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "edge-vlm" / "venv"


def venv_bin(prefix: Path) -> Path:
    """The venv's scripts folder (``bin``, or ``Scripts`` on Windows)."""
    return prefix / ("Scripts" if os.name == "nt" else "bin")


def _exe(prefix: Path, name: str) -> Path:
    return venv_bin(prefix) / (name + (".exe" if os.name == "nt" else ""))


def _say(text: str) -> None:
    print(f"install: {text}", flush=True)


def _run(cmd: list[str], what: str, capture: bool = False) -> str:
    """Run a step; raise KitError(EXIT_FAILED) with its output when it fails."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None,
                          text=True)
    if proc.returncode != 0:
        tail = ("\n" + proc.stdout.strip()[-2000:]) if capture and proc.stdout else ""
        raise KitError(f"{what} failed (exit code {proc.returncode}): "
                       + " ".join(cmd) + tail, EXIT_FAILED)
    return proc.stdout or ""


def check_prefix(prefix: Path) -> bool:
    """Whether the prefix is an existing venv to reuse (False: it will be created).

    Raises:
        KitError: it exists and is something else.
    """
    if not prefix.exists():
        return False
    if (prefix / "pyvenv.cfg").is_file():
        return True
    if prefix.is_dir() and not any(prefix.iterdir()):
        return False
    raise KitError(f"--prefix {prefix} exists and is not a Python venv: choose an empty or "
                   "new folder (the installer will not write into other files)")


def install(root: Path, prefix: Path, self_check: bool = True) -> int:
    """Install the kit at ``root`` into a venv at ``prefix``.

    Raises:
        KitError: refused (nothing touched) or a step failed (what was made is removed).
    """
    kit = check_kit(root, prefix=prefix)
    reuse = check_prefix(prefix)
    _say(f"kit of edge-vlm {kit['edge_vlm']} for Python {', '.join(kit['python'])} on "
         f"{kit['platform']['system']} {kit['platform']['machine']}, llama.cpp backends "
         f"{', '.join(kit['llama_cpp']['backends'])}: intact")
    created = False
    try:
        if not reuse:
            _say(f"creating a venv in {prefix}")
            prefix.parent.mkdir(parents=True, exist_ok=True)
            created = True
            _run([sys.executable, "-m", "venv", str(prefix)], "creating the venv", capture=True)
        else:
            _say(f"reusing the venv in {prefix}")
        requirement = kit["requirement"]
        _say(f"installing {requirement} from {root / 'wheels'} (no index, wheels only)")
        env_pip = [str(_exe(prefix, "python")), "-m", "pip", "install", "--isolated",
                   "--no-index", "--find-links", str(root / "wheels"), "--only-binary", ":all:",
                   "--disable-pip-version-check", "--no-input", "--quiet", requirement]
        _run(env_pip, "pip install", capture=True)
    except BaseException:
        if created:
            shutil.rmtree(prefix, ignore_errors=True)
        raise
    edge = str(_exe(prefix, "edge-vlm"))
    for model in kit.get("models", []):
        if model.get("shipped"):
            _say(f"model '{model['name']}': comes inside edge-vlm")
            continue
        _say(f"model '{model['name']}': importing into the model store")
        _run([edge, "models", "import", str(root / model["model"]), "--mmproj",
              str(root / model["mmproj"]), "--name", model["name"]],
             f"importing model '{model['name']}' (the venv is installed; retry with "
             f"{edge} models import ...)")
    answer = ""
    check = kit.get("selfcheck")
    if self_check and check:
        _say(f"self-check: {edge} run -m default -i {check['image']} {check['prompt']!r}")
        answer = _run([edge, "run", "--model", "default", "--temperature", "0",
                       "--max-tokens", "64", "--image", str(root / check["image"]),
                       check["prompt"]], "the self-check", capture=True).strip()
        if answer != check["expected"]:
            raise KitError(f"self-check failed: the shipped model answered {answer!r}, "
                           f"expected {check['expected']!r}; the install in {prefix} may be "
                           "broken", EXIT_FAILED)
    store = _run([str(_exe(prefix, "python")), "-c",
                  "from edge_vlm.config import data_dir; print(data_dir() / 'models')"],
                 "finding the model store", capture=True).strip()
    print(f"\nedge-vlm {kit['edge_vlm']} is installed.")
    print(f"  command:     {edge}")
    print(f"  venv:        {prefix}")
    print(f"  model store: {store}  ({edge} models list)")
    if answer:
        print(f"  self-check:  passed ({answer!r})")
    if os.name != "nt":
        print(f"  to use it as `edge-vlm`: add {venv_bin(prefix)} to PATH, or "
              f"ln -s {edge} ~/.local/bin/edge-vlm")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``install.py [--prefix DIR] [--no-self-check]`` (run by install.sh / install.ps1)."""
    parser = argparse.ArgumentParser(
        prog="install.sh", description="Install edge-vlm and its models from this kit, "
        "offline: no package index, no compiler.")
    parser.add_argument("--prefix", type=Path, default=None,
                        help=f"the venv to create (default: {default_prefix()})")
    parser.add_argument("--no-self-check", action="store_true",
                        help="skip asking the shipped model about the sample image")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent
    prefix = (args.prefix or default_prefix()).expanduser().absolute()
    try:
        return install(root, prefix, self_check=not args.no_self_check)
    except KitError as err:
        print(f"install: error: {err.message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("install: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

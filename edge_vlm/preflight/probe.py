"""The first real load of an unknown model pair, in a child process.

llama.cpp aborts or segfaults on some malformed files instead of returning an error (a
missing mmproj tensor is a SIGSEGV). The bounded header checks catch the known cases; this
catches the rest: a child ``python -m edge_vlm.preflight.probe MODEL MMPROJ`` loads the pair,
evaluates a few tokens and encodes one small image. If the child dies, the parent reports
"model failed validation: ..." and lives on.

Run as a module it is the child; it prints one JSON line starting with ``{"probe":``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_vlm.errors import EdgeVLMError, ModelLoadError

if TYPE_CHECKING:
    from edge_vlm.store.store import Store

_MARK = '{"probe":'
PROBE_N_CTX = 256
"""Context of the check load: small, the check is about the files, not the context."""


@dataclass(frozen=True)
class ProbeResult:
    """A successful check load.

    Attributes:
        peak_rss: Peak resident memory of the child, bytes.
        seconds: Wall time of the child.
    """

    peak_rss: int
    seconds: float


def probe_pair(model: Path, mmproj: Path, *, timeout: float = 600.0,
               names: tuple[str, str] | None = None) -> ProbeResult:
    """Load a pair in a child process and report how that went.

    Args:
        model: Language model GGUF.
        mmproj: Vision projector GGUF.
        timeout: Seconds before the child is killed and the pair refused.
        names: How to name the files in messages (default: their paths).

    Raises:
        ModelLoadError: "model failed validation: ..." when the child crashes, times
            out, or llama.cpp refuses the files.
    """
    shown_model, shown_proj = names or (str(model), str(mmproj))
    what = f"model '{shown_model}' with mmproj '{shown_proj}'"
    cmd = [sys.executable, "-m", "edge_vlm.preflight.probe", str(model), str(mmproj)]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, errors="replace",
                              env=os.environ | {"GGML_NO_BACKTRACE": "1"})
    except subprocess.TimeoutExpired:
        raise ModelLoadError(
            f"model failed validation: loading {what} took over {timeout:.0f} s; raise "
            "store.check_load_timeout_s for a very large model on a slow disk"
        ) from None
    except OSError as err:
        raise ModelLoadError(f"model failed validation: cannot start the check: {err}") from None
    seconds = time.monotonic() - start
    result = _last_result(proc.stdout)
    why = _reason(proc.stderr)
    detail = f" (llama.cpp: {why})" if why else ""

    def named(text: str) -> str:  # the child saw staging paths; speak of the user's files
        return text.replace(str(model), shown_model).replace(str(mmproj), shown_proj)

    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        raise ModelLoadError(
            f"model failed validation: llama.cpp crashed ({sig}) loading {what}; the files "
            f"are damaged, incomplete or not made for this llama.cpp{named(detail)}"
        )
    if result is not None and not result.get("ok"):
        message = str(result.get("error")).replace(" (run with --verbose to see llama.cpp's log)",
                                                   "")
        raise ModelLoadError(f"model failed validation: {named(message)}{named(detail)}")
    if proc.returncode != 0 or result is None:
        raise ModelLoadError(
            f"model failed validation: the check load of {what} exited with status "
            f"{proc.returncode}{named(detail)}"
        )
    return ProbeResult(int(result.get("peak_rss", 0)), round(seconds, 2))


def _last_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(_MARK):
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(line)["probe"]
                return value if isinstance(value, dict) else None
    return None


_TELLING = re.compile(r"GGML_ASSERT|error|failed|unable to|missing|invalid|unsupported", re.I)
_CHATTER = re.compile(r"^(print_info:|llama_model_loader: - kv|\{)")
_SOURCE_PATH = re.compile(r"\S*/([\w.-]+\.(?:c|cpp|h):\d+)")


def _reason(stderr: str) -> str:
    """The most telling line of llama.cpp's log: an assertion, else the first error."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    telling = [ln for ln in lines if _TELLING.search(ln) and not _CHATTER.match(ln)]
    asserts = [ln for ln in telling if "GGML_ASSERT" in ln]
    line = (asserts or telling or lines[-1:] or [""])[0]
    return _SOURCE_PATH.sub(r"\1", line)[:300]


# -- the check cache for pairs loaded by path ------------------------------------------------


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def ensure_checked(model: Path, mmproj: Path, store: Store, *, timeout: float = 600.0) -> None:
    """Check-load a pair given by path once (remembered by path, size, mtime and inode).

    Pairs in the store were checked when installed and the shipped model is trusted: both
    return at once. Meant for the loader, before the in-process load.

    Raises:
        ModelLoadError: the pair failed the check.
    """
    from edge_vlm.shipped import shipped_model_dir
    from edge_vlm.store.fsutil import atomic_write_json

    trusted = (store.blobs.resolve(), shipped_model_dir().resolve())
    if all(any(p.resolve().is_relative_to(t) for t in trusted) for p in (model, mmproj)):
        return
    key = hashlib.sha256(f"{_fingerprint(model)}|{_fingerprint(mmproj)}".encode()).hexdigest()
    cache = store.root / "checked.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if key in known:
        return
    result = probe_pair(model, mmproj, timeout=timeout)
    known[key] = {"model": str(model), "mmproj": str(mmproj), "peak_rss": result.peak_rss}
    if len(known) > 256:
        known = dict(list(known.items())[-256:])
    with contextlib.suppress(OSError, EdgeVLMError), store.lock(timeout=5.0):
        atomic_write_json(cache, known)


# -- the child ----------------------------------------------------------------------------


def _peak_rss() -> int:
    """This process's peak resident memory, bytes.

    Linux's ``VmHWM`` belongs to the address space made by exec; ``ru_maxrss`` survives
    exec and would report the parent's size at fork time when the parent is larger.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))


def _child(model: str, mmproj: str) -> dict[str, Any]:
    from edge_vlm.backend import Backend, BackendConfig, ImageChunk, RGBImage
    from edge_vlm.gguf.constants import TILING_PROJECTORS
    from edge_vlm.gguf.reader import read_gguf
    from edge_vlm.store.manifest import tokens_per_image

    proj = read_gguf(mmproj)
    side = max(16, min(proj.get_int("clip.vision.image_size") or 224, 1024))
    # A tiling projector would cut the image into up to 17 tiles: a one-tile budget checks
    # the same graph in two passes (the tile and the overview).
    tiling = (proj.get_str("clip.projector_type") or "") in TILING_PROJECTORS
    budget = tokens_per_image(proj) if tiling else 0
    backend = Backend(BackendConfig(
        model_path=Path(model), mmproj_path=Path(mmproj), n_ctx=PROBE_N_CTX, n_batch=64,
        threads=max(1, min(4, os.cpu_count() or 1)), n_gpu_layers=0, mmproj_use_gpu=False,
        flash_attn="auto", verbose=True,  # the log goes to the parent, for its message
    ))
    try:
        tokens = backend.tokenize_text("Hello", add_special=True, parse_special=False)
        backend.eval_tokens(tokens[:8] or [backend.bos], 0)
        backend.last_logits()
        # A mid-grey image at the encoder's own size: one pass for most projectors.
        image = RGBImage(side, side, bytes([128]) * (side * side * 3), "probe")
        with backend.tokenize_prompt(backend.marker, [image], max_image_tokens=budget) as chunks:
            for chunk in chunks.items:
                if isinstance(chunk, ImageChunk):
                    backend.encode_image(chunks, chunk)
                    break
    finally:
        backend.close()
    return {"ok": True, "peak_rss": _peak_rss()}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m edge_vlm.preflight.probe MODEL MMPROJ``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m edge_vlm.preflight.probe MODEL.gguf MMPROJ.gguf", file=sys.stderr)
        return 2
    try:
        result = _child(args[0], args[1])
    except EdgeVLMError as err:
        result = {"ok": False, "error": err.message}
    except Exception as err:  # report anything the load raised, as text
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    sys.stdout.write(json.dumps({"probe": result}) + "\n")
    sys.stdout.flush()
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

"""Hard limits for untrusted chat templates: a probe render in a child process.

The in-process sandbox (:mod:`edge_vlm.template`) bounds what it can see: ranges, string
and list sizes, integer growth, render time checked between operations. One native
operation it did not foresee can still allocate gigabytes or run for minutes. So before a
template is first used (at load) and before a model is imported, a child
``python -m edge_vlm.sandbox`` compiles it and renders a probe conversation under
``RLIMIT_AS`` and ``RLIMIT_CPU``, with a wall-clock timeout. A child that dies, runs out of
memory or time, or fails the render gets the template refused, with the reason.

Run as a module it is the child: it reads ``{"source", "bos", "eos"}`` as JSON on stdin and
prints one JSON line ``{"template": "ok"}`` or ``{"template": "error", "reason": ...}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from edge_vlm.errors import ModelLoadError

#: Address space of the child, bytes (Python, Jinja and pydantic take ~100 MiB of it).
CHILD_MEMORY = 1024 * 1024 * 1024
#: CPU seconds of the child.
CHILD_CPU_SECONDS = 20
#: Wall-clock seconds before the child is killed (a loaded machine starts Python slowly).
CHILD_TIMEOUT = 60.0

_MARK = '{"template":'
#: Part of the remembered checks' key: raise it when the probe or the bounds change.
_CHECK_VERSION = 1
_checked: set[str] = set()
_lock = threading.Lock()


def check_template(source: str, bos: str = "", eos: str = "", *,
                   timeout: float = CHILD_TIMEOUT) -> None:
    """Compile and render ``source`` on a probe conversation in a child process with hard
    memory and CPU limits; remember a template that passed, for this process.

    Raises:
        ModelLoadError: naming why the template was refused.
    """
    key = hashlib.sha256(json.dumps([source, bos, eos, _CHECK_VERSION]).encode()).hexdigest()
    with _lock:
        if key in _checked:
            return
    marker = _marker(key)
    if marker is not None and marker.is_file():
        with _lock:
            _checked.add(key)
        return
    reason = _run_child(source, bos, eos, timeout)
    if reason is not None:
        raise ModelLoadError(f"the model's chat template was refused: {reason}")
    with _lock:
        _checked.add(key)
    if marker is not None:
        # Remembered across processes, so that `edge-vlm run` does not pay the child's
        # start-up on every call; a template that failed is never remembered.
        with contextlib.suppress(OSError):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()


def _marker(key: str) -> Path | None:
    """Where a passed check is remembered: ``templates-checked/`` in the cache dir."""
    try:
        from edge_vlm.config import cache_dir

        return cache_dir() / "templates-checked" / key
    except Exception:  # no usable cache dir: check every time
        return None


def check_gguf_template(metadata: Mapping[str, object], shown: str) -> None:
    """Probe the chat template a GGUF's metadata carries (none: nothing to check).

    Raises:
        ModelLoadError: "model 'NAME': the model's chat template was refused: REASON".
    """
    source = metadata.get("tokenizer.chat_template")
    if not isinstance(source, str) or not source:
        return
    try:
        check_template(source)
    except ModelLoadError as err:
        raise ModelLoadError(f"model '{shown}': {err}; this model file is not safe to "
                             "serve as it is") from None


def _run_child(source: str, bos: str, eos: str, timeout: float) -> str | None:
    """None if the probe render passed, else why not."""
    cmd = [sys.executable, "-m", "edge_vlm.sandbox"]
    payload = json.dumps({"source": source, "bos": bos, "eos": eos})
    try:
        proc = subprocess.run(cmd, input=payload, capture_output=True, text=True,
                              timeout=timeout, errors="replace",
                              env=os.environ | {"PYTHONHASHSEED": "0"})
    except subprocess.TimeoutExpired:
        return f"rendering a probe conversation took over {timeout:.0f} s"
    except OSError as err:
        return f"cannot start the template check: {err}"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            result = json.loads(line)
            if result.get("template") == "ok":
                return None
            return str(result.get("reason", "it failed"))
    if proc.returncode < 0:
        sig = -proc.returncode
        if sig == signal.SIGXCPU:
            return f"rendering a probe conversation used over {CHILD_CPU_SECONDS} s of CPU"
        if sig == signal.SIGKILL:
            return "rendering a probe conversation was killed (memory or time)"
        return f"rendering a probe conversation crashed (signal {sig})"
    if "MemoryError" in proc.stderr:
        return (f"rendering a probe conversation needed over "
                f"{CHILD_MEMORY // (1024 * 1024)} MiB of memory")
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return f"the template check failed: {tail[0][:300]}"


def _limit_child() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (CHILD_CPU_SECONDS, CHILD_CPU_SECONDS + 5))


def probe_conversation() -> list[dict[str, object]]:
    """The conversation the child renders: every role, text and an image, two turns."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            {"type": "text", "text": "What is in this picture?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And its colour?"},
    ]


def _child_main() -> int:
    # Without rlimits on this platform, the parent's wall-clock timeout still holds.
    with contextlib.suppress(ImportError, OSError, ValueError):
        _limit_child()
    data = json.loads(sys.stdin.read())
    try:
        from edge_vlm.errors import RequestError
        from edge_vlm.schema import parse_messages
        from edge_vlm.template import ChatTemplate

        template = ChatTemplate(data["source"], bos_token=data["bos"], eos_token=data["eos"],
                                check_in_child=False)
        full = probe_conversation()
        for probe in (full, full[1:2], full[3:]):
            # RequestError: the template's own raise_exception, its rules, not an attack.
            with contextlib.suppress(RequestError):
                template.render_prompt(parse_messages(probe), "<__media__>")
    except MemoryError:
        print(json.dumps({"template": "error", "reason": (
            f"rendering a probe conversation needed over {CHILD_MEMORY // (1024 * 1024)} MiB "
            "of memory")}), flush=True)
        return 1
    except Exception as err:  # every failure is the template's; report it
        reason = getattr(err, "message", None) or f"{type(err).__name__}: {err}"
        reason = str(reason).removeprefix("the model's chat template ").removeprefix(
            "was stopped: ")
        print(json.dumps({"template": "error", "reason": str(reason)[:500]}), flush=True)
        return 1
    print(json.dumps({"template": "ok"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())

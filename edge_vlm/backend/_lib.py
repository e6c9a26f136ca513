"""llama.cpp and libmtmd as Python sees them: the package's one ``import llama_cpp``, the
one-time library initialisation and the log callback.

Every other module of :mod:`edge_vlm.backend` takes ``llama_cpp`` and ``mtmd`` from here,
so the OpenMP setting below is in place before llama.cpp's library loads.
"""

from __future__ import annotations

import ctypes
import os
import threading

# llama.cpp's CPU threads meet at a barrier after every graph node (~1,300 per token). This
# build runs them with OpenMP, whose runtime (libgomp) spins ~300,000 times (milliseconds)
# before a waiting thread sleeps: on a busy machine, a thread whose partner was descheduled
# burns its core waiting for it, and between tokens the workers spin while Python samples.
# A bounded spin still catches the microsecond waits of an idle machine, then yields the
# core; sleeping at once (OMP_WAIT_POLICY=passive) made idle decoding ~3x slower on a
# 2-vCPU VM (42-47 against 138-142 tokens/s, two threads), every barrier then waiting for
# a wake-up. Under load the thread count does most (see cpuload.py). libgomp reads this
# once, when it loads: before `import llama_cpp`, and only when the user has chosen nothing
# (OMP_WAIT_POLICY or GOMP_SPINCOUNT set: theirs wins).
OMP_SPINCOUNT = "20000"
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = OMP_SPINCOUNT

import llama_cpp  # noqa: E402
import llama_cpp.mtmd_cpp as mtmd  # noqa: E402

__all__ = ["OMP_SPINCOUNT", "init_once", "llama_cpp", "mtmd"]

# ---------------------------------------------------------------------------------------
# Logging: quiet unless verbose. The callbacks must stay referenced for the process life.


_verbose = False
_log_lock = threading.Lock()


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if _verbose and text:
        os.write(2, text)


_backend_ready = False


def init_once(verbose: bool | None = None) -> None:
    """Route llama.cpp's and libmtmd's log to our callback and initialise llama.cpp's
    backend, once per process; set whether the log is shown (None: leave it as it is)."""
    global _verbose, _backend_ready
    with _log_lock:
        if verbose is not None:
            _verbose = verbose
        if not _backend_ready:
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            mtmd.mtmd_log_set(_log_callback, ctypes.c_void_p(0))
            mtmd.mtmd_helper_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True

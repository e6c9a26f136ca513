"""Checks the runtime makes before a model pair is loaded in-process.

- :mod:`~edge_vlm.preflight.probe`: a first load of an unknown pair in a child process, so a
  llama.cpp crash on a bad file is reported instead of killing edge-vlm;
- :mod:`~edge_vlm.preflight.memory`: the memory a pair needs at a context size, and whether
  it fits now.

They sit above the store (they use the backend and the settings; the store uses neither):
:func:`open_store` gives the store the load check it runs when a model is installed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from edge_vlm.config import Settings, data_dir
from edge_vlm.store.store import Store

if TYPE_CHECKING:
    from edge_vlm.resolve import ModelRef


def open_store(settings: Settings) -> Store:
    """The user's model store, configured by ``settings.store``, able to check-load pairs."""
    from edge_vlm.preflight.probe import probe_pair

    s = settings.store
    return Store(data_dir() / "models", verify_on_load=s.verify_on_load,
                 catalog_file=s.catalog_file, load_check=probe_pair,
                 check_load_timeout_s=s.check_load_timeout_s)


def check_before_load(ref: ModelRef, settings: Settings, store: Store) -> None:
    """Before the in-process load: a one-time load of an unknown pair in a child process
    (``store.check_load``), and a warning when the pair will not fit in memory now.

    Raises:
        ModelLoadError: the pair failed the child-process load.
    """
    from edge_vlm.preflight.memory import memory_warning
    from edge_vlm.preflight.probe import ensure_checked

    if settings.store.check_load:
        ensure_checked(ref.model, ref.mmproj, store,
                       timeout=settings.store.check_load_timeout_s)
    warning = memory_warning(Path(ref.model), Path(ref.mmproj), settings)
    if warning:
        warnings.warn(warning, stacklevel=4)

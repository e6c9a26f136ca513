"""The command-line flags every model-loading subcommand shares, and the settings they make.

A leaf of the CLI (argparse and :mod:`edge_vlm.config` only): ``edge-vlm`` and each
subcommand's module (``chat``, ``models``, ``batch``, ...) import it, never one another.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydantic is not imported for `edge-vlm --help`
    from edge_vlm.config import Settings


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--mmproj`` and the runtime flags, in a "model" group."""
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", help="model name, 'default' (shipped) or a GGUF path")
    g.add_argument("--mmproj", help="vision projector GGUF for a model given as a path")
    g.add_argument("--n-ctx", type=int, help="context window in tokens")
    g.add_argument("--threads", type=int,
                   help="CPU threads, used as given (default: follow the machine's load, "
                        "at most one per physical core)")
    g.add_argument("--gpu", choices=["auto", "on", "off"], help="GPU offload (default: auto)")
    g.add_argument("--flash-attn", choices=["auto", "on", "off"],
                   help="flash attention (default: auto)")
    g.add_argument("--verbose", action="store_true", default=None,
                   help="show llama.cpp's log on stderr")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings overrides (dotted keys) from the shared model and image flags; a flag not
    given is None (the settings keep their value)."""
    return {
        "runtime.n_ctx": getattr(args, "n_ctx", None),
        "runtime.threads": getattr(args, "threads", None),
        "runtime.gpu": getattr(args, "gpu", None),
        "runtime.flash_attn": getattr(args, "flash_attn", None),
        "runtime.verbose": getattr(args, "verbose", None),
        "images.allow_remote": getattr(args, "allow_remote_images", None),
        "images.detail": getattr(args, "detail", None),
    }


def settings_from_flags(args: argparse.Namespace,
                        extra: Mapping[str, Any] | None = None) -> Settings:
    """The settings of a subcommand: file and environment, then its flags on top.

    Args:
        args: The parsed flags (the shared model flags are read when present).
        extra: The subcommand's own flags, as dotted setting keys.

    Raises:
        ConfigError: an invalid or unknown setting, naming it and where it came from.
    """
    from edge_vlm.config import load_settings

    return load_settings().with_overrides(
        {**model_overrides(args), **(extra or {})},
        source="the command-line flags")

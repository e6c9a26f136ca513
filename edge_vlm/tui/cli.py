"""``edge-vlm chat``: argparse only at import time (``edge-vlm --help`` stays instant)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_parser(subparsers: Any, add_model_flags: Callable[[argparse.ArgumentParser], None]) -> (
        None):
    """Add the ``chat`` subcommand to the ``edge-vlm`` parser."""
    p = subparsers.add_parser(
        "chat", help="talk about images in a terminal app (Textual)",
        description="Talk about images with a local vision-language model, in the terminal. "
                    "Inside the app, F1 lists every key and command.")
    p.add_argument("--image", "-i", action="append", default=[], metavar="PATH",
                   help="attach an image to the first message (repeatable)")
    p.add_argument("--system", help="system prompt (default: tui.system_prompt)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default from settings)")
    p.add_argument("--max-tokens", type=int, help="longest answer (default from settings)")
    p.add_argument("--detail", choices=["auto", "low", "high"],
                   help="image detail (default: images.detail); F2 changes it in the app")
    add_model_flags(p)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``chat``'s own flags set (the shared model flags come on top)."""
    return {
        "tui.system_prompt": getattr(args, "system", None),
        "sampling.temperature": getattr(args, "temperature", None),
        "sampling.max_tokens": getattr(args, "max_tokens", None),
        "images.detail": getattr(args, "detail", None),
    }


def main(args: argparse.Namespace) -> int:
    """Run the app until the user quits."""
    from edge_vlm.flags import settings_from_flags

    settings = settings_from_flags(args, _overrides(args))  # a ConfigError: shown by the CLI

    from edge_vlm.tui.app import ChatApp

    app = ChatApp(settings, model=args.model, mmproj=args.mmproj, images=args.image)
    app.run()
    return app.return_code or 0

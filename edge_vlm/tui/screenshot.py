"""Write an SVG screenshot of ``edge-vlm chat`` answering a question (for the README).

    python -m edge_vlm.tui.screenshot edge_vlm/tui/screenshot.svg \\
        [--model default] [--image PATH] [--question "What shape is in the image?"]

The app runs headless (Textual's Pilot) with the real model; the conversation is saved in a
temporary folder, not in the user's history.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path


def _default_image() -> Path | None:
    from edge_vlm.resolve import samples_dir

    samples = sorted(samples_dir().glob("*.png"))
    return samples[-1] if samples else None


async def _shoot(args: argparse.Namespace, out: Path, home: Path) -> None:
    from edge_vlm.config import load_settings
    from edge_vlm.tui.app import ChatApp
    from edge_vlm.tui.conversation import ConversationStore

    settings = load_settings({"tui.thumbnails": "halfcell",
                              "sampling.max_tokens": args.max_tokens})
    app = ChatApp(settings, model=args.model, mmproj=args.mmproj, store=ConversationStore(home),
                  cwd=Path.cwd(), samples=None)
    width, height = (int(v) for v in args.size.split("x"))
    async with app.run_test(size=(width, height)) as pilot:
        chat = app.chat

        async def until(condition: object, what: str, timeout: float = 300.0) -> None:
            deadline = time.monotonic() + timeout
            while not condition():  # type: ignore[operator]
                if chat.status.state == "failed" or time.monotonic() > deadline:
                    raise SystemExit(f"screenshot: {what} did not happen "
                                     f"(status: {chat.status.state})")
                await pilot.pause(0.1)

        await until(lambda: chat.model is not None, "loading the model")
        if args.image:
            chat.prompt.text = f"/image {args.image}"
            await pilot.press("enter")
            await until(lambda: bool(chat.attachments.images), "attaching the image")
        chat.prompt.text = args.question
        await pilot.press("enter")
        await until(lambda: bool(chat.conversation.turns) and not chat.generating,
                    "the answer")
        chat.prompt.cursor_blink = False
        await pilot.pause(0.3)
        app.save_screenshot(out.name, path=str(out.parent.resolve()))


def main(argv: list[str] | None = None) -> int:
    """Write the screenshot; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m edge_vlm.tui.screenshot")
    parser.add_argument("out", type=Path, help="the SVG file to write")
    parser.add_argument("--model", default=None, help="model name or GGUF path")
    parser.add_argument("--mmproj", default=None)
    parser.add_argument("--image", type=Path, default=None,
                        help="image to attach (default: a shipped sample)")
    parser.add_argument("--question", default="What shape is in the image?")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--size", default="80x24", help="terminal size, WxH")
    args = parser.parse_args(argv)
    args.image = args.image or _default_image()
    with tempfile.TemporaryDirectory() as home:
        asyncio.run(_shoot(args, args.out, Path(home)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

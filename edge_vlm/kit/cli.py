"""``edge-vlm kit build|verify``: an offline install kit for an air-gapped machine.

Imported for ``edge-vlm --help``: argparse only at module level.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_vlm.errors import EdgeVLMError


class KitInputError(EdgeVLMError):
    """A kit folder that cannot be read as a kit (exit code 2)."""

    exit_code = 2


def add_parser(subparsers: Any, add_model_flags: Callable[[argparse.ArgumentParser], None]
               ) -> None:
    """Add the ``kit`` subcommand and its own subcommands."""
    kit = subparsers.add_parser(
        "kit", help="build or check an offline install kit (wheels + models + install.sh)",
        description="A folder that installs edge-vlm, its llama.cpp build and models on a "
                    "machine with no network and no compiler: build it here, copy it, run "
                    "`bash install.sh` there.")
    sub = kit.add_subparsers(dest="kit_command", metavar="ACTION")

    build = sub.add_parser(
        "build", help="write a kit folder (needs a package index or pip's local wheels)",
        description="Write OUT/ with every wheel (llama-cpp-python repacked as installed "
                    "here, so its Metal/CUDA build carries over), the chosen models, "
                    "install.sh / install.ps1, kit.json and SHA256SUMS. pip's own "
                    "configuration (PIP_INDEX_URL, PIP_FIND_LINKS, pip.conf) applies.")
    build.add_argument("out", type=Path, metavar="OUT", help="the kit folder to create")
    build.add_argument("--model", action="append", dest="models", metavar="NAME",
                       help="an installed model to include (repeatable; default: the shipped "
                            "shapes-vlm only, which travels inside the edge-vlm wheel)")
    build.add_argument("--extras", default="", metavar="LIST",
                       help="edge-vlm extras to include, comma-separated (e.g. bench)")
    build.add_argument("--python", metavar="X.Y[,X.Y]",
                       help="Python versions the kit installs on (default: this one); "
                            "others get binary wheels downloaded for them")
    build.add_argument("--force", action="store_true", help="replace OUT if it exists")

    verify = sub.add_parser("verify", help="re-hash a kit and report changed, missing or "
                                           "extra files")
    verify.add_argument("path", type=Path, metavar="KIT", help="the kit folder")


def main(args: argparse.Namespace) -> int:
    """Run a ``kit`` action."""
    action = getattr(args, "kit_command", None)
    if action == "build":
        return _build(args)
    if action == "verify":
        return _verify(args)
    print("usage: edge-vlm kit {build,verify} ...\nrun `edge-vlm kit --help` for details",
          file=sys.stderr)
    return 2


class _Bars:
    """Rich progress on stderr: a bar for byte-counted steps, a spinner for pip's."""

    def __init__(self, live: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.live = live
        self.console = Console(stderr=True)
        class Bytes(DownloadColumn):
            """Bytes done / total, for the steps that count bytes only."""

            def render(self, task: Any) -> Any:
                return super().render(task) if task.fields.get("counted") else ""

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 Bytes(), TimeElapsedColumn(),
                                 TextColumn("[dim]{task.fields[note]}"), console=self.console,
                                 disable=not live)
        self.task: Any = None
        self.label = ""

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done()
        self.progress.stop()

    def _done(self) -> None:
        if self.task is not None:
            t = self.progress.tasks[-1]
            self.progress.update(self.task, total=t.total or t.completed or 1,
                                 completed=t.total or t.completed or 1, note="")

    def step(self, label: str, total: int | None = None) -> None:
        self._done()
        self.label = label
        self.task = self.progress.add_task(label, total=total, note="",
                                           counted=total is not None)
        if not self.live:
            print(f"kit: {label}", file=sys.stderr, flush=True)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def note(self, text: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, note=text[:60])


def _build(args: argparse.Namespace) -> int:
    from edge_vlm.flags import settings_from_flags
    from edge_vlm.kit.build import build_kit, parse_pythons
    from edge_vlm.preflight import open_store
    from edge_vlm.store.manifest import human_size

    store = open_store(settings_from_flags(args))
    pythons = parse_pythons(args.python)
    extras = [e for e in args.extras.split(",") if e.strip()]
    with _Bars(sys.stderr.isatty()) as bars:
        result = build_kit(args.out, models=args.models, extras=extras, pythons=pythons,
                           force=args.force, steps=bars, store=store)
    m = result.manifest
    total = sum(result.sizes.values())
    print(f"kit written: {result.path} ({human_size(total)}: wheels "
          f"{human_size(result.sizes['wheels'])}, models {human_size(result.sizes['models'])})")
    print(f"  edge-vlm {m['edge_vlm']}, Python {', '.join(m['python'])}, "
          f"{m['platform']['system']} {m['platform']['machine']}, llama.cpp "
          f"{m['llama_cpp']['version']} ({', '.join(m['llama_cpp']['backends'])})")
    print(f"  models: {', '.join(x['name'] for x in m['models']) or 'none'}")
    print(f"  on the offline machine: bash {result.path.name}/install.sh [--prefix DIR]")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from edge_vlm.kit.installer import KitError, check_integrity, read_kit

    root = args.path.expanduser()
    if not root.is_dir():
        raise KitInputError(f"kit folder '{root}' does not exist")
    try:
        kit = read_kit(root)
        with _Bars(sys.stderr.isatty()) as bars:
            total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
            bars.step(f"checking {root.name}", total)

            def on_file(rel: str, size: int) -> None:
                bars.advance(size)
            result = check_integrity(root, on_file)
    except KitError as err:
        raise KitInputError(err.message) from None
    for line in result.lines():
        print(line)
    for junk in result.junk:
        print(f"ignored (added by an operating system): {junk}")
    if not result.intact:
        print(f"{root}: NOT intact ({len(result.changed)} changed, {len(result.missing)} "
              f"missing, {len(result.extra)} extra): install.sh will refuse it; copy the kit "
              "again", file=sys.stderr)
        return 1
    print(f"{root}: intact, {len(result.checked)} files (edge-vlm {kit['edge_vlm']}, Python "
          f"{', '.join(kit['python'])}, {kit['platform']['system']} "
          f"{kit['platform']['machine']})")
    return 0


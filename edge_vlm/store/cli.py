"""``edge-vlm models ...``: import, pull, list, show, rm, verify, catalog, gc.

Imported for ``edge-vlm --help``: argparse only at module level; everything else is
imported inside :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_vlm.config import Settings
    from edge_vlm.store.manifest import Manifest
    from edge_vlm.store.store import Store


def add_parser(subparsers: Any, add_model_flags: Callable[[argparse.ArgumentParser], None]
               ) -> None:
    """Add the ``models`` subcommand and its own subcommands."""
    models = subparsers.add_parser(
        "models", help="install and manage models (import, pull, list, show, rm, verify)",
        description="The model store: models installed by name, usable everywhere a model "
                    "is taken (run, chat, serve, edge_vlm.load).")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION")

    imp = sub.add_parser("import", help="install a GGUF model + mmproj pair from files")
    imp.add_argument("path", help="the language-model GGUF, or a folder holding the pair")
    imp.add_argument("--mmproj", help="the vision projector GGUF (default: the one beside it)")
    imp.add_argument("--name", help="name to install under (default: from the file name)")
    imp.add_argument("--link", action="store_true",
                     help="hard-link instead of copying (or, across filesystems, use the "
                          "files where they are)")
    imp.add_argument("--no-check-load", action="store_true",
                     help="skip the test load in a child process")

    pull = sub.add_parser("pull", help="download a catalog model (see `models catalog`)")
    pull.add_argument("name", help="catalog name, e.g. smolvlm-256m")
    pull.add_argument("--quant", help="quantization (default: the catalog's default)")
    pull.add_argument("--name", dest="as_name", metavar="NAME", help="install under this name")
    pull.add_argument("--no-check-load", action="store_true",
                      help="skip the test load in a child process")

    ls = sub.add_parser("list", help="installed models")
    ls.add_argument("--json", action="store_true", help="print JSON")

    show = sub.add_parser("show", help="a model's manifest, template and memory estimate")
    show.add_argument("name")
    show.add_argument("--n-ctx", type=int, help="context size to estimate memory for")
    show.add_argument("--json", action="store_true", help="print JSON")

    rm = sub.add_parser("rm", help="remove installed models (shared files stay)")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("--yes", "-y", action="store_true", help="do not ask")

    ver = sub.add_parser("verify", help="re-hash installed files and report changes")
    ver.add_argument("names", nargs="*", metavar="NAME", help="default: every model")

    cat = sub.add_parser("catalog", help="models that can be pulled, and whether they fit")
    cat.add_argument("--n-ctx", type=int, help="context size to judge the fit at")
    cat.add_argument("--long", action="store_true", help="show repositories, files and notes")

    sub.add_parser("gc", help="delete stored files no model uses")


def main(args: argparse.Namespace) -> int:
    """Run a ``models`` action."""
    from edge_vlm.flags import settings_from_flags
    from edge_vlm.preflight import open_store

    action = getattr(args, "models_command", None)
    if action is None:
        print("usage: edge-vlm models {import,pull,list,show,rm,verify,catalog,gc} ...\n"
              "run `edge-vlm models --help` for details", file=sys.stderr)
        return 2
    settings = settings_from_flags(args)
    store = open_store(settings)
    handler: Callable[[argparse.Namespace, Store, Settings], int] = _ACTIONS[action]
    return handler(args, store, settings)


# -- progress -----------------------------------------------------------------------------


class _RichProgress:
    """A rich progress bar on stderr, one task per file (nothing when not a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
            transient=False,
        )
        self.task: Any = None

    def start(self, label: str, total: int) -> None:
        if self.task is None and not self.progress.live.is_started:
            self.progress.start()
        self.task = self.progress.add_task(label, total=total)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def finish(self) -> None:
        self.progress.refresh()

    def close(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


def _progress() -> _RichProgress | None:
    return _RichProgress() if sys.stderr.isatty() else None


def _close(p: _RichProgress | None) -> None:
    if p is not None:
        p.close()


# -- actions ------------------------------------------------------------------------------


def _import(args: argparse.Namespace, store: Store, settings: Settings) -> int:
    from edge_vlm.store.importer import find_pair, import_pair
    from edge_vlm.store.manifest import StoreInputError as StoreError

    path = Path(args.path).expanduser()
    if path.is_dir():
        if args.mmproj:
            raise StoreError(f"'{path}' is a folder: give the model file with --mmproj, "
                             "or the folder alone")
        model, mmproj = find_pair(path)
        print(f"found model {model.name} and mmproj {mmproj.name}", file=sys.stderr)
    else:
        model = path
        if args.mmproj:
            mmproj = Path(args.mmproj).expanduser()
        elif path.is_file():
            found_model, mmproj = find_pair(path.parent)
            if found_model.resolve() != path.resolve():
                raise StoreError(f"'{path}' is not the language model beside {mmproj.name}; "
                                 "pass --mmproj")
            print(f"using mmproj {mmproj.name}", file=sys.stderr)
        else:
            raise StoreError(f"model file '{path}' does not exist")
    bar = _progress()
    try:
        manifest, new = import_pair(
            store, model, mmproj, name=args.name, link="link" if args.link else "copy",
            check_load=settings.store.check_load and not args.no_check_load,
            check_timeout=settings.store.check_load_timeout_s, progress=bar,
        )
    finally:
        _close(bar)
    _report_installed(manifest, new)
    return 0


def _pull(args: argparse.Namespace, store: Store, settings: Settings) -> int:
    from edge_vlm.store.catalog import load_catalog
    from edge_vlm.store.pull import pull

    entry = load_catalog(settings.store.catalog_file).require(args.name)
    bar = _progress()
    try:
        manifest, new, notes = pull(
            store, entry, quant=args.quant, name=args.as_name,
            check_load=settings.store.check_load and not args.no_check_load,
            check_timeout=settings.store.check_load_timeout_s, progress=bar,
        )
    finally:
        _close(bar)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    _report_installed(manifest, new)
    return 0


def _report_installed(m: Manifest, new: bool) -> None:
    from edge_vlm.store.manifest import human_size

    if not new:
        print(f"'{m.name}' is already installed with these files")
        return
    linked = [f.filename for f in m.files if f.path]
    how = f" (used in place: {', '.join(linked)})" if linked else ""
    print(f"installed '{m.name}': {human_size(m.size)}, {m.facts.quantization or '?'}, "
          f"{m.facts.projector_type or '?'} projector{how}")
    print(f"use it with: edge-vlm run -m {m.name} -i IMAGE 'Describe the image.'")


def _all_models(store: Store) -> tuple[list[Manifest], list[str]]:
    models, problems = store.installed()
    shipped = store.shipped()
    return ([shipped] if shipped else []) + models, problems


def _row(m: Manifest) -> dict[str, Any]:
    f = m.facts
    return {
        "name": m.name,
        "size": m.size,
        "quantization": f.quantization,
        "parameters": f.parameters,
        "context": f.context_length,
        "vision": f.projector_type,
        "image_tokens": f.image_tokens,
        "last_used": m.last_used,
        "shipped": m.shipped,
    }


def _list(args: argparse.Namespace, store: Store, settings: Settings) -> int:
    from edge_vlm.store.manifest import human_count, human_size

    models, problems = _all_models(store)
    if args.json:
        print(json.dumps([_row(m) for m in models], indent=2))
    else:
        header = ("NAME", "SIZE", "QUANT", "PARAMS", "CONTEXT", "VISION", "LAST USED")
        rows = [header]
        for m in models:
            f = m.facts
            vision = f"{f.projector_type} {f.image_tokens} tok" if f.projector_type else "?"
            used = (m.last_used or "never").replace("T", " ").replace("+00:00", "Z")
            rows.append((m.name + (" (shipped)" if m.shipped else ""), human_size(m.size),
                         f.quantization or "?", human_count(f.parameters) if f.parameters else "?",
                         str(f.context_length or "?"), vision,
                         "-" if m.shipped else used))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if len(rows) == 1:
            print("(no models: edge-vlm models import MODEL.gguf --mmproj MMPROJ.gguf, or "
                  "edge-vlm models pull NAME)")
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace, store: Store, settings: Settings) -> int:
    from dataclasses import asdict

    from edge_vlm.preflight.memory import estimate, estimate_options
    from edge_vlm.store.manifest import human_count, human_size

    m = store.get(args.name)
    model_path, mmproj_path = store.paths(m)
    est = estimate(m.facts, m.file("model").size, m.file("mmproj").size,
                   **estimate_options(settings))
    if args.json:
        out = m.to_dict() | {"paths": {"model": str(model_path), "mmproj": str(mmproj_path)},
                             "memory": asdict(est) | {"total": est.total, "verdict": est.verdict}}
        print(json.dumps(out, indent=2))
        return 0
    f = m.facts
    print(f"name:           {m.name}{' (shipped with edge-vlm)' if m.shipped else ''}")
    for entry, path in ((m.file("model"), model_path), (m.file("mmproj"), mmproj_path)):
        digest = entry.sha256 or "not recorded"
        print(f"{entry.role + ':':<16}{entry.filename} ({human_size(entry.size)}), sha256 {digest}")
        print(f"{'':<16}at {path}{' (in place)' if entry.path and not m.shipped else ''}")
    print(f"source:         {_describe_source(m.source)}")
    print(f"licence:        {m.license or 'unknown'}")
    print(f"architecture:   {f.architecture}, {human_count(f.parameters)} parameters, "
          f"{f.n_layer} layers, width {f.embedding_width}, {f.quantization}")
    print(f"context:        {f.context_length} tokens (trained)")
    from edge_vlm.gguf.families import family_name

    print(f"family:         {family_name(f.projector_type, f.architecture)}")
    print(f"vision:         {f.projector_type} projector, {human_count(f.vision_parameters)} "
          f"parameters, {f.mmproj_quantization}, image {f.image_size} px / patch "
          f"{f.patch_size}, {f.image_tokens} tokens per image"
          + (f" (per tile; images up to {f.preproc_image_size} px are tiled)"
             if f.preproc_image_size else ""))
    template = "present" if f.has_chat_template else "MISSING (a generic one is used)"
    print(f"chat template:  {template}")
    if m.validated:
        print(f"load check:     passed in a child process ({m.validated.get('seconds')} s, peak "
              f"{human_size(m.validated.get('peak_rss', 0))})")
    if not m.shipped:
        print(f"added:          {m.added}; last used: {m.last_used or 'never'}")
    print(f"memory:         {est.summary()}")
    for label, size in est.breakdown():
        print(f"  {label:<44}{human_size(size):>10}")
    return 0


def _describe_source(src: dict[str, Any]) -> str:
    kind = src.get("kind")
    if kind == "pull":
        return f"pulled from {src.get('endpoint')}/{src.get('repo')} (commit {src.get('commit')})"
    if kind == "import":
        frm = src.get("from", {})
        return f"imported from {frm.get('model')} and {frm.get('mmproj')} on {src.get('host')}"
    if kind == "shipped":
        return f"shipped with edge-vlm ({src.get('from')})"
    return json.dumps(src)


def _rm(args: argparse.Namespace, store: Store, settings: Settings) -> int:
    from edge_vlm.errors import StoreError
    from edge_vlm.store.manifest import StoreInputError, check_name, human_size

    targets: list[tuple[str, int | None]] = []
    for n in args.names:
        try:
            m = store.get(n)
            targets.append((m.name, m.size))
        except StoreInputError:
            raise
        except StoreError:  # a damaged manifest: removing it is the repair
            targets.append((check_name(n), None))
    if not args.yes:
        if not sys.stdin.isatty():
            raise StoreInputError("not removing without confirmation: add --yes")
        what = ", ".join(f"'{n}' ({human_size(s) if s is not None else 'damaged'})"
                         for n, s in targets)
        answer = input(f"remove {what}? [y/N] ").strip().lower()
        if answer not in {"y", "yes"}:
            print("nothing removed")
            return 1
    for name, size in targets:
        freed = store.remove(name)
        print(f"removed '{name}', freed {human_size(freed)}"
              + ("" if size is None or freed == size
                 else " (files shared with other models stay)"))
    return 0


def _verify(args: argparse.Namespace, store: Store, settings: Settings) -> int:
    from edge_vlm.store.manifest import human_size

    if args.names:
        models = [store.get(n) for n in args.names]
        problems: list[str] = []
    else:
        models, problems = _all_models(store)
    bar = _progress()
    results: list[Any] = []
    try:
        for m in models:
            results.extend(store.verify([m.name], progress=bar))
    finally:
        _close(bar)
    bad = 0
    for r in results:
        if r.status in {"missing", "changed"}:
            bad += 1
            print(f"{r.name} {r.role}: {r.status.upper()}: {r.path}: {r.detail}")
        else:
            print(f"{r.name} {r.role}: {r.status}" + (f" ({r.detail})" if r.detail else ""))
    for p in problems:
        bad += 1
        print(f"DAMAGED: {p}")
    if not args.names:
        stray = store.unreferenced_bytes()
        if stray:
            print(f"note: {human_size(stray)} of stored files belong to no model "
                  "(an interrupted install); `edge-vlm models gc` removes them")
    if bad:
        print(f"{bad} problem(s): re-import or re-pull the models named above", file=sys.stderr)
        return 1
    print(f"all {len(results)} file(s) of {len(models)} model(s) are intact")
    return 0


def _catalog(args: argparse.Namespace, store: Store, settings: Settings) -> int:
    from edge_vlm.preflight.memory import estimate_catalog
    from edge_vlm.store.catalog import load_catalog
    from edge_vlm.store.manifest import human_size

    catalog = load_catalog(settings.store.catalog_file)
    installed = {m.name for m in store.installed()[0]}
    marks = {"fits": "fits", "tight": "tight", "won't fit": "won't fit", "unknown": "?"}
    rows = [("NAME", "MODEL", "QUANT", "DOWNLOAD", "MEMORY", "THIS MACHINE", "LICENCE", "")]
    for entry in sorted(catalog.entries.values(), key=lambda e: e.name):
        file = entry.default_file()
        est = estimate_catalog(entry, file, settings)
        rows.append((entry.name, entry.title, entry.default,
                     f"~{human_size(file.size + entry.mmproj.size)}",
                     f"~{human_size(est.total)}", marks[est.verdict], entry.license,
                     "installed" if entry.name in installed else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if args.long:
        for entry in sorted(catalog.entries.values(), key=lambda e: e.name):
            print(f"\n{entry.name}: {entry.repo}@{entry.revision}")
            for q, f in entry.quants.items():
                print(f"  {q:<8}{f.file or '(from the repository file list)'} "
                      f"(~{human_size(f.size)})")
            print(f"  mmproj  {entry.mmproj.file or '(the best match there)'} "
                  f"(~{human_size(entry.mmproj.size)})")
            if entry.notes:
                print(f"  {entry.notes}")
    print(f"\nmemory at {settings.runtime.n_ctx or 'up to 8192'} tokens of context; "
          "sizes from the catalog, approximate. Pull with: edge-vlm models pull NAME "
          "[--quant Q]")
    return 0


def _gc(args: argparse.Namespace, store: Store, settings: Settings) -> int:
    from edge_vlm.store.manifest import human_size

    print(f"freed {human_size(store.gc())}")
    return 0


_ACTIONS: dict[str, Callable[[argparse.Namespace, Store, Settings], int]] = {
    "import": _import,
    "pull": _pull,
    "list": _list,
    "show": _show,
    "rm": _rm,
    "verify": _verify,
    "catalog": _catalog,
    "gc": _gc,
}

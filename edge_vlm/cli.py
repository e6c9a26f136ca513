"""The ``edge-vlm`` command. Thin: parses flags, imports heavy parts only in the subcommand
that needs them (``edge-vlm --help`` stays instant), converts errors once.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_vlm import __version__
from edge_vlm.errors import EdgeVLMError
from edge_vlm.flags import add_model_flags, model_overrides

__all__ = ["build_parser", "main", "model_overrides"]

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Handler] = {}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="edge-vlm",
        description="Ask questions about images with a local vision-language model "
                    "(llama.cpp, offline).",
    )
    parser.add_argument("--version", action="version", version=f"edge-vlm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="answer one prompt about images, streaming to stdout")
    run.add_argument("prompt", nargs="?", help="the question (default: read from stdin)")
    run.add_argument("--image", "-i", action="append", default=[], metavar="PATH",
                     help="image file or URL (repeatable; shown before the prompt)")
    run.add_argument("--system", help="system message")
    run.add_argument("--max-tokens", type=int, help="most tokens to generate")
    run.add_argument("--temperature", type=float, help="0 = greedy (default from settings)")
    run.add_argument("--seed", type=int, help="sampling seed")
    run.add_argument("--stop", action="append", help="stop string (repeatable)")
    run.add_argument("--detail", choices=["auto", "low", "high"], help="image detail")
    run.add_argument("--json", action="store_true",
                     help="print the chat-completion response JSON instead of streaming")
    run.add_argument("--stats", action="store_true", help="print timing stats to stderr")
    run.add_argument("--allow-remote-images", action="store_true", default=None,
                     help="allow http(s) image URLs (off: nothing touches the network)")
    add_model_flags(run)

    info = sub.add_parser("info", help="show llama.cpp backends, settings and paths")
    add_model_flags(info)

    ev = sub.add_parser(
        "eval", help="exact-match accuracy on the shipped model's shapes world",
        description="Exact-match accuracy of a model on fresh scenes of the shipped model's "
                    "synthetic shapes world. The world and the evaluation live with the "
                    "model's training code, models/shapes-vlm/training/shapes_vlm/ of a source "
                    "checkout (not in the wheel): run this from a checkout.")
    ev.add_argument("--scenes", type=int, default=100,
                    help="fresh scenes per variant (about 6.5 questions each)")
    ev.add_argument("--seed", type=int, default=7, help="seed of the evaluation images")
    ev.add_argument("--variants", default="png",
                    help="comma list of png,jpeg70,640x360,300x500 (default: png)")
    add_model_flags(ev)

    for name, module in _PLUGINS.items():
        mod = _plugin(module)
        if mod is not None:
            mod.add_parser(sub, add_model_flags)
            _COMMANDS.setdefault(name, mod.main)
    return parser


#: Subcommands living in their own packages. Each module exposes
#: ``add_parser(subparsers, add_model_flags)`` (argparse only: imported for --help) and
#: ``main(args) -> int`` (imports heavy parts inside).
_PLUGINS = {
    "chat": "edge_vlm.tui.cli",
    "serve": "edge_vlm.server.cli",
    "models": "edge_vlm.store.cli",
    "batch": "edge_vlm.batch.cli",
    "kit": "edge_vlm.kit.cli",
}


def _plugin(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):
            return None  # that subcommand is not part of this install
        raise


def _command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = fn
        return fn
    return register


def _load(args: argparse.Namespace) -> Any:
    from edge_vlm.api import load
    from edge_vlm.flags import settings_from_flags

    return load(args.model, args.mmproj, settings=settings_from_flags(args))


def _image_url(value: str) -> str:
    """CLI image arguments: URLs pass through; paths become absolute (they are the user's)."""
    if "://" in value or value.startswith("data:"):
        return value
    return str(Path(value).expanduser().resolve())


@_command("run")
def _run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise _UsageError("no prompt: give it as an argument or on stdin")
        prompt = sys.stdin.read().strip()
    if not prompt:
        raise _UsageError("the prompt is empty")
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": _image_url(p)}} for p in args.image
    ]
    content.append({"type": "text", "text": prompt})
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": content})
    fields = {k: v for k, v in {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
        "stop": args.stop}.items() if v is not None}

    from edge_vlm.stats import summary_line

    with _load(args) as vlm:
        if args.json:
            reply = vlm.chat(messages, **fields)
            print(reply.model_dump_json(indent=2, exclude_none=True))
            stats = reply.timings
        else:
            stats = None
            for chunk in vlm.chat(messages, stream=True, **fields):
                for choice in chunk.choices:
                    if choice.delta.content:
                        sys.stdout.write(choice.delta.content)
                        sys.stdout.flush()
                if chunk.timings is not None:
                    stats = chunk.timings
            sys.stdout.write("\n")
        if args.stats and stats is not None:
            print(summary_line(stats), file=sys.stderr)
    return 0


@_command("info")
def _info(args: argparse.Namespace) -> int:
    from edge_vlm.backend import system_info
    from edge_vlm.config import config_dir, data_dir, settings_origin
    from edge_vlm.flags import settings_from_flags
    from edge_vlm.loader import default_threads
    from edge_vlm.shipped import shipped_model_dir

    settings = settings_from_flags(args)
    origin = settings_origin(model_overrides(args))
    sysinfo = system_info()
    print(f"edge-vlm {__version__} (llama-cpp-python {sysinfo['llama_cpp_python']})")
    print(f"llama.cpp: {sysinfo['system_info']}")
    print(f"backends: {', '.join(_backends(sysinfo))}")
    print(f"gpu offload: {sysinfo['gpu_offload']} (runtime.gpu = {settings.runtime.gpu})")
    if settings.runtime.threads:
        print(f"threads: {settings.runtime.threads} (runtime.threads)")
    else:
        print(f"threads: follow the machine's load, at most {default_threads()} "
              "(one per physical core)")
    cfg = origin.config_file
    print(f"config file: {cfg} ({'read' if origin.config_file_exists else 'not present'})")
    print(f"environment: {', '.join(origin.env_vars) or 'no EDGE_VLM_* variables'}")
    print(f"flags: {', '.join(origin.overrides) or 'none'}")
    print(f"config dir: {config_dir()}")
    print(f"data dir (models, conversations): {data_dir()}")
    print(f"shipped model: {shipped_model_dir()}")
    print("settings:")
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0


def _backends(sysinfo: dict[str, str]) -> list[str]:
    text = sysinfo["system_info"]
    found = ["CPU"]
    for name in ("Metal", "CUDA", "Vulkan", "SYCL", "ROCm", "HIP", "OpenCL", "BLAS", "RPC"):
        if name.upper() in text.upper():
            found.append(name)
    return found


@_command("eval")
def _eval(args: argparse.Namespace) -> int:
    from edge_vlm.shipped import import_training

    evaluation = import_training("evaluate")  # from the checkout: not part of the runtime
    results = {}
    with _load(args) as vlm:
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            res = evaluation.evaluate(vlm, n_scenes=args.scenes, seed=args.seed,
                                      variant=variant)
            ok, n = res["overall"]
            print(f"{vlm.name} {variant}: {100 * ok / n:.1f}% of {n}", file=sys.stderr,
                  flush=True)
            results[f"{vlm.name} {variant}"] = res
    print(evaluation.format_table(results))
    return 0


class _UsageError(EdgeVLMError):
    exit_code = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-vlm`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args)
    except EdgeVLMError as err:
        if args.debug:
            raise
        print(f"edge-vlm: error: {err.message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("edge-vlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

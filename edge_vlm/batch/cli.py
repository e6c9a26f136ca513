"""``edge-vlm batch``: ask questions about a whole folder of images, offline.

:func:`add_parser` uses argparse only (it runs for ``edge-vlm --help``); :func:`main` imports
the model and rich when the command runs.

Exit codes: 0 every answer succeeded, 1 some answers failed (the count is printed), 2 bad
usage or input (nothing was run), 130 interrupted (Ctrl+C; run again with ``--resume``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_vlm.batch.summary import BatchSummary

_EPILOG = """\
examples:
  edge-vlm batch photos/ -p "Describe the image." --out captions.jsonl
  edge-vlm batch scans/ --recursive -p "Extract the fields." --schema form.json \\
      --out forms.jsonl
  edge-vlm batch manifest.csv --out answers.jsonl --resume
  edge-vlm batch archive/ -r -p "Describe the image." --out captions.jsonl \\
      --ray --workers 4 --threads-per-worker 2
  edge-vlm batch archive/ -r -p "Describe the image." --out captions.jsonl --ray auto

Each prompt is a fresh conversation about the image (--conversation: consecutive turns of
one conversation); an image is encoded once however many prompts are asked about it.
Every answer is one JSON line: path, image_sha256, prompt, prompt_index, answer (text, or
the parsed JSON with --schema), finish_reason, usage, timings, model, settings, key, error.
--resume skips the answers already in the results file and retries the failed ones.
Ctrl+C stops after the current answer (twice: at once).
--ray runs the same batch on Ray Data (pip install 'edge-vlm[ray]'): alone, a local Ray on
this machine; with an ADDRESS (auto, ray://host:10001), an existing cluster whose nodes
hold edge-vlm, the model and the images. This process writes the results file either way.
"""


def add_parser(subparsers: Any, add_model_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Create the ``batch`` subcommand (argparse only: no heavy imports)."""
    p = subparsers.add_parser(
        "batch",
        help="ask prompts about many images, writing one JSON line per answer",
        description="Ask prompts about image files, folders or manifests; results go to a "
                    "JSONL file line by line, with progress, resume and structured output.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders of images, or JSONL/CSV manifests of image paths "
                        "(with an optional prompt per image)")
    p.add_argument("--prompt", "-p", action="append", default=[], metavar="TEXT",
                   help="a question asked of every image (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="more questions, one a line (# comments and blank lines skipped)")
    p.add_argument("--schema", metavar="SCHEMA.json",
                   help="constrain every answer to this JSON schema; answers are written as JSON")
    p.add_argument("--system", metavar="TEXT", help="system message")
    p.add_argument("--out", "-o", required=True, metavar="RESULTS.jsonl",
                   help="the results file (JSON lines, appended and flushed line by line)")
    p.add_argument("--max-tokens", type=int, help="most tokens per answer")
    p.add_argument("--temperature", type=float, help="0 = greedy (default from settings)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--detail", choices=["auto", "low", "high"], help="image detail")
    p.add_argument("--recursive", "-r", action="store_true",
                   help="include images in subfolders of folder inputs")
    p.add_argument("--conversation", action="store_true",
                   help="ask an image's prompts as consecutive turns of one conversation")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run: skip answers already in --out, retry failed ones")
    p.add_argument("--overwrite", action="store_true", help="empty an existing --out first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray Data: a local Ray (no ADDRESS), or a cluster "
                        "(auto, ray://host:10001); needs the 'ray' extra")
    p.add_argument("--workers", type=int, metavar="N",
                   help="with --ray: model replicas (default 1)")
    p.add_argument("--threads-per-worker", type=int, metavar="T",
                   help="with --ray: llama.cpp threads and Ray CPUs per replica (default: "
                        "--threads, else this machine's cores shared by the workers)")
    p.add_argument("--gpus-per-worker", type=float, metavar="G",
                   help="with --ray: GPUs reserved per replica (0.25: four share one GPU; "
                        "default 0)")
    add_model_flags(p)


def _check_flags(args: argparse.Namespace) -> None:
    from edge_vlm.batch.inputs import BatchInputError

    if args.max_tokens is not None and args.max_tokens < 1:
        raise BatchInputError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.temperature is not None and not 0.0 <= args.temperature <= 2.0:
        raise BatchInputError(f"--temperature must be between 0 and 2, got {args.temperature}")
    if args.ray not in (None, "local", "auto") and ":" not in args.ray:
        # `--ray photos/ ...`: argparse took the first input as the optional ADDRESS
        raise BatchInputError(
            f"--ray ADDRESS got {args.ray!r}, which is not a Ray address (auto, "
            "ray://host:10001, host:6379); for a local Ray put --ray after the inputs, or "
            "write --ray=ADDRESS")
    if args.ray is None and (args.workers is not None or args.threads_per_worker is not None
                             or args.gpus_per_worker is not None):
        raise BatchInputError("--workers, --threads-per-worker and --gpus-per-worker need "
                              "--ray")


def main(args: argparse.Namespace) -> int:
    """Run ``edge-vlm batch``; returns the exit code."""
    from edge_vlm.batch.engines import run
    from edge_vlm.batch.inputs import (
        BatchInputError,
        discover,
        read_prompts_file,
        read_schema_file,
    )
    from edge_vlm.batch.options import BatchOptions
    from edge_vlm.batch.output import ResultWriter
    from edge_vlm.batch.progress import BatchProgress
    from edge_vlm.config import load_settings

    _check_flags(args)
    prompts = [p.strip() for p in args.prompt if p.strip()]
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    schema = read_schema_file(args.schema) if args.schema else None
    items = discover(args.inputs, recursive=args.recursive)
    if not items:
        hint = "" if args.recursive else " (add --recursive to look in subfolders)"
        raise BatchInputError(f"no images found in {', '.join(args.inputs)}{hint}")
    if not prompts and not all(item.prompts for item in items):
        raise BatchInputError("no prompt: give --prompt TEXT (repeatable), --prompts-file FILE, "
                              "or a prompt column in a manifest")
    from edge_vlm.flags import model_overrides

    settings = load_settings(model_overrides(args))
    options = BatchOptions(system=args.system, schema=schema, conversation=args.conversation,
                           max_tokens=args.max_tokens, temperature=args.temperature,
                           seed=args.seed, detail=args.detail)
    ray_options = None
    if args.ray is not None:
        from edge_vlm.batch.raydata import RayOptions, import_ray

        import_ray()  # before the results file is touched
        ray_options = RayOptions(address=None if args.ray == "local" else args.ray,
                                 workers=args.workers or 1,
                                 threads_per_worker=args.threads_per_worker,
                                 gpus_per_worker=args.gpus_per_worker or 0.0,
                                 quiet=not settings.runtime.verbose)

    err = sys.stderr
    stop = threading.Event()
    progress = BatchProgress(len(items), enabled=not args.no_progress)
    # The handler is in place from the moment the results file is open until the summary
    # is printed, so Ctrl+C at any point (loading the model, starting Ray, answering,
    # leaving Ray) ends with the summary and exit code 130, the results file resumable.
    with _StopOnSigint(stop, err) as sigint:
        with ResultWriter.open(args.out, resume=args.resume,
                               overwrite=args.overwrite) as writer:
            if writer.kept or writer.dropped or writer.truncated:
                print(_resume_note(writer), file=err)
            try:
                results = run(items, prompts, model=args.model, mmproj=args.mmproj,
                              settings=settings, options=options, out=writer, stop=stop,
                              engine="local" if ray_options is None else "ray",
                              ray=ray_options)
                try:
                    with progress:
                        for result in results:
                            progress.update(result)
                finally:
                    results.close()  # releases the model, or stops and leaves Ray
            except KeyboardInterrupt:  # the second Ctrl+C
                stop.set()
            sigint.winding_down()
        return _report(progress.summary, stop, writer.path, err)


def _report(summary: BatchSummary, stop: threading.Event, path: Path, err: Any) -> int:
    """Print the summary; the exit code."""
    summary.interrupted = stop.is_set() and summary.images_remaining > 0
    print(f"edge-vlm batch: {summary.describe()}", file=err)
    if summary.interrupted:
        print(f"edge-vlm batch: stopped; continue with the same command and --resume "
              f"(results so far are in {path})", file=err)
        return 130
    if summary.answers_failed:
        total = summary.answers_ok + summary.answers_failed
        print(f"edge-vlm batch: {summary.answers_failed} of {total} answers failed; their "
              f"lines in {path} carry the error (--resume retries them)", file=err)
        return 1
    return 0


def _resume_note(writer: Any) -> str:
    parts = [f"resuming {writer.path}: {len(writer.index)} answers already there will be "
             "skipped"]
    if writer.dropped:
        parts.append(f"{writer.dropped} failed ones will be retried")
    if writer.truncated:
        parts.append(f"a torn last line ({writer.truncated} bytes) from an interrupted "
                     "write was cut away")
    return "edge-vlm batch: " + "; ".join(parts)


class _StopOnSigint:
    """First Ctrl+C: set ``stop`` (finish the current answer). Second: KeyboardInterrupt
    (stop at once). Later ones while the run winds down are noted and ignored, so the
    clean-up (the model released, Ray left) finishes and the summary is printed."""

    def __init__(self, stop: threading.Event, err: Any) -> None:
        self._stop = stop
        self._err = err
        self._old: Any = None
        self._presses = 0

    def winding_down(self) -> None:
        """The run is over: from now on Ctrl+C is only noted."""
        self._presses = max(self._presses, 2)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._presses += 1
        self._stop.set()
        if self._presses == 1:
            self._say("stopping after the current answer (Ctrl+C again to stop at once)")
        elif self._presses == 2:
            self._say("stopping at once")
            raise KeyboardInterrupt
        else:
            self._say("still stopping: the results so far are kept")

    def _say(self, text: str) -> None:
        print(f"\nedge-vlm batch: {text}", file=self._err, flush=True)

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

"""The Ray engine of ``edge-vlm batch --ray``: the same batch on Ray Data, one machine or many.

The pipeline: the batch's images (one row each) → a read stage (the file's bytes, or why
they cannot be read; fused into the next stage, so it runs in the actor) → ``map_batches``
with :class:`_Answerer`, an actor per model replica
that loads the model once and runs :func:`~edge_vlm.batch.runner.answer_image` on each
image (every prompt, the image encoded once) → the results back to the driver, which
writes every line itself (one writer, fsync per line, the local engine's ``--resume``).

Failures: Ray Data restarts a dead actor and retries its image elsewhere
(``max_restarts=-1``, ``max_task_retries=-1`` are its defaults for actor pools); only the
driver writes, and only whole images, so a retried image is written once. Workers skip
the answers the results file already holds (a snapshot of the keys is shipped to them); the
driver consumes its resume index as results arrive, and an image whose skip it cannot
account for (the same file twice, recorded once) is asked again in a second pass.

Ray is an optional dependency (``pip install 'edge-vlm[ray]'``), imported only here.
"""

from __future__ import annotations

import base64
import gc
import logging
import os
import pickle
import re
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_vlm import errors
from edge_vlm.batch.inputs import BatchInputError, BatchItem
from edge_vlm.batch.options import Plan, prompts_of
from edge_vlm.batch.output import ResultWriter
from edge_vlm.batch.results import BatchError, BatchResult
from edge_vlm.batch.runner import ImageInput, answer_image, read_input
from edge_vlm.errors import EdgeVLMError

if TYPE_CHECKING:
    from edge_vlm.api import VLM
    from edge_vlm.batch.identity import ModelFiles
    from edge_vlm.config import Settings
    from edge_vlm.image_source import ImagePolicy

RAY_EXTRA_HINT = "pip install 'edge-vlm[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray batch runs.

    Attributes:
        address: None: start a local Ray for this run (no cluster needed); ``auto``: the
            cluster this machine belongs to; ``ray://host:10001``: a remote cluster; or a
            GCS address ``host:6379``.
        workers: Model replicas (Ray actors), each answering one image at a time.
        threads_per_worker: llama.cpp threads (and Ray CPUs) of each replica; None: the
            ``--threads`` setting, else this machine's physical cores shared by the workers.
        gpus_per_worker: GPUs Ray reserves for each replica (0.25: four share a GPU) and
            shows it (``CUDA_VISIBLE_DEVICES``); 0: none reserved (Ray 2.60 then leaves
            the node's GPUs visible, and llama.cpp may offload to them unscheduled).
        quiet: Silence Ray's own progress bars and logs (the driver shows its own).
    """

    address: str | None = None
    workers: int = 1
    threads_per_worker: int | None = None
    gpus_per_worker: float = 0.0
    quiet: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise BatchInputError(f"--workers must be at least 1, got {self.workers}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise BatchInputError(
                f"--threads-per-worker must be at least 1, got {self.threads_per_worker}")
        if self.gpus_per_worker < 0:
            raise BatchInputError(
                f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}")

    def threads(self, settings: Settings) -> int:
        """The llama.cpp threads of each replica."""
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        if settings.runtime.threads is not None:
            return settings.runtime.threads
        from edge_vlm.loader import default_threads

        return max(1, default_threads() // self.workers)


def import_ray() -> Any:
    """The ``ray`` module, or a clear error naming the extra to install."""
    try:
        import ray
        import ray.data  # ray[data]: the extra brings pyarrow and pandas
    except ImportError as err:
        raise BatchInputError(
            f"--ray needs Ray Data, which is not installed ({err.msg}): {RAY_EXTRA_HINT}, "
            "or run the batch without --ray") from None
    return ray


def run_ray(items: list[BatchItem], base: tuple[str, ...], plan: Plan, model: ModelFiles,
            settings: Settings, opts: RayOptions, writer: ResultWriter | None,
            stop: threading.Event | None) -> Iterator[BatchResult]:
    """Run the batch on Ray; yields each image's results as they reach the driver, which
    writes them to ``writer`` (when given) before yielding. Starts Ray (or connects) on
    the first ``next()`` and shuts it down at the end unless it was already running."""
    ray = import_ray()
    if stop is not None and stop.is_set():
        return  # stopped (Ctrl+C) while the batch was being prepared: do not start Ray
    started = not ray.is_initialized()
    if started:
        _init(ray, opts, settings)
    try:
        if stop is None or not stop.is_set():  # not stopped while Ray was starting
            yield from _passes(ray, items, base, plan, model, settings, opts, writer, stop)
    finally:
        if started:
            # Finalize what still refers to Ray objects while the core worker is alive
            # (see _wait_for_iteration_threads).
            gc.collect()
            ray.shutdown()


def _init(ray: Any, opts: RayOptions, settings: Settings) -> None:
    kwargs: dict[str, Any] = {"include_dashboard": False}
    if opts.quiet:
        kwargs.update(log_to_driver=False, logging_level=logging.ERROR)
        # Ray's C++ core logs to the driver's stderr directly: e.g. a warning on every
        # Ray Data actor pool about restartable actors with arguments in the object store.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        # Ray Data's stats actor sometimes fails to update a finished dataset's metrics
        # under load (KeyError in _StatsActor.update_dataset): noise, not our results.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    if opts.address is None:
        # A local Ray just for this run (never a cluster RAY_ADDRESS points at). Enough
        # CPUs for every replica's threads plus the read stage, even on a small machine.
        need = opts.workers * opts.threads(settings) + 1
        kwargs.update(address="local", num_cpus=max(os.cpu_count() or 1, need))
    else:
        kwargs["address"] = opts.address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = opts.address or "a local Ray"
        raise BatchInputError(f"cannot start or reach Ray at {where}: {err}; check --ray "
                              "ADDRESS (auto, ray://host:10001) or run `ray status`") from None


def _passes(ray: Any, items: list[BatchItem], base: tuple[str, ...], plan: Plan,
            model: ModelFiles, settings: Settings, opts: RayOptions,
            writer: ResultWriter | None, stop: threading.Event | None) -> Iterator[BatchResult]:
    from edge_vlm.batch.resume import ResumeIndex

    index = writer.index if writer is not None else ResumeIndex()
    pending = list(range(len(items)))
    while pending:
        deferred: list[int] = []
        recorded = index.keys()
        unused = len(index)
        for i, results in _stream(ray, items, pending, base, plan, model, settings, opts,
                                  recorded):
            skipped = [r for r in results if r.status == "skipped"]
            if not all(index.has(r.key) for r in skipped):
                deferred.append(i)  # a duplicate image whose lines ran out: ask it again
                continue
            for r in results:
                if r.status == "skipped":
                    r.recorded = index.take(r.key)
                elif writer is not None:
                    writer.write(r.record())
                yield r
            if stop is not None and stop.is_set():
                return
        # An image is deferred only when a key of the snapshot was used up during the
        # pass, so every pass that defers consumes lines: the passes end.
        assert not deferred or len(index) < unused
        pending = deferred


def _stream(ray: Any, items: list[BatchItem], todo: list[int], base: tuple[str, ...],
            plan: Plan, model: ModelFiles, settings: Settings, opts: RayOptions,
            recorded: dict[str, Any]) -> Iterator[tuple[int, list[BatchResult]]]:
    """Run one pass over the images ``todo``; yields (image index, its results)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if opts.quiet:
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    rows = [{"i": i, "path": str(items[i].path), "prompts": list(items[i].prompts)}
            for i in todo]
    threads = opts.threads(settings)
    # One image per block (up to a cap): an image's results reach the driver as soon as it
    # is done, and a dead worker costs only its image.
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 100_000))
    # The read stage asks for the replicas' CPUs so Ray Data fuses it into the actor stage
    # (Map(_Reader)->MapBatches(_Answerer)): the bytes are read where they are answered and
    # never cross the object store, and an image costs one Ray task, not two.
    gpus = opts.gpus_per_worker or None
    from edge_vlm.image_source import ImagePolicy

    ds = ds.map(_Reader(ImagePolicy.from_settings(settings.images)), num_cpus=threads,
                num_gpus=gpus)
    ds = ds.map_batches(
        _Answerer, batch_size=1, concurrency=opts.workers, num_cpus=threads, num_gpus=gpus,
        fn_constructor_kwargs={"model": model, "settings": settings, "threads": threads,
                               "plan": plan, "base": base,
                               "recorded": [ray.put(recorded)]})
    before = set(threading.enumerate())
    it = ds.iter_rows()
    try:
        for row in it:
            yield int(row["i"]), pickle.loads(row["results"])
    except ray.exceptions.RayError as err:
        raise _edge_error(err) from None
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
        _wait_for_iteration_threads(before)


# Ray Data runs an iteration's pipeline (fetching each block with ray.get, formatting
# rows) in threads of its own, named so in Ray 2.x; closing the iterator signals them but
# does not join them. A thread still winding down when ray.shutdown() runs finalizes its
# generators against a core worker that is gone, and Ray then ends the whole process at
# once with exit code 1, printing nothing (its log line "The core worker has already been
# shutdown ... The process will exit" is below the log level set in _init): after Ctrl+C
# the driver died without its summary. Its other new thread ("Prefetcher") parks idle for
# the life of the process holding no object, so it is not waited for.
_ITERATION_THREADS = ("iter_threaded", "map_tp_")
_ITERATION_THREADS_WAIT_S = 30.0


def _wait_for_iteration_threads(before: set[threading.Thread]) -> None:
    """Wait (up to 30 s in all) for Ray Data's iteration threads started since ``before``;
    a KeyboardInterrupt meanwhile (Ctrl+C twice) is raised once they are done."""
    deadline = time.monotonic() + _ITERATION_THREADS_WAIT_S
    interrupted = False
    for thread in threading.enumerate():
        if thread in before or not thread.name.startswith(_ITERATION_THREADS):
            continue
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                thread.join(max(0.0, deadline - time.monotonic()))
            except KeyboardInterrupt:
                interrupted = True
    if interrupted:
        raise KeyboardInterrupt


class RayRunError(EdgeVLMError):
    """The Ray run failed as a whole (the results written so far stay; ``--resume``)."""


def _edge_error(err: Exception) -> EdgeVLMError:
    """The edge-vlm error a replica raised (e.g. a model file differing from the
    driver's), from the text of the Ray error wrapping it; else a :class:`RayRunError`."""
    text = str(err)
    found = re.findall(r"edge_vlm\.[\w.]*\.(\w+Error): (.+)", text)
    if found:
        name, message = found[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, EdgeVLMError):
            return cls(message.strip())
        return RayRunError(message.strip())
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return RayRunError(f"the Ray run failed ({type(err).__name__}: {first}); the results "
                       "written so far are kept: fix the cause and run again with --resume")


class _Reader:
    """The read stage: a row's image file → its bytes and SHA-256, or why it is unreadable."""

    def __init__(self, policy: ImagePolicy) -> None:
        self.policy = policy

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        image, data = read_input(BatchItem(Path(row["path"])), self.policy)
        err = image.error
        return {**row, "data": data or b"", "sha256": image.sha256 or "",
                "error": b"" if err is None else pickle.dumps(err)}


class _Snapshot:
    """The keys in the results file when the pass started (a worker's view of the resume
    index: it never consumes; the driver does)."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers

    def take(self, key: str) -> dict[str, Any] | None:
        if key not in self.answers:
            return None
        return {"answer": self.answers[key]}


class _Answerer:
    """One model replica (a Ray actor): checks the model files against the driver's
    digests, loads the model once, then answers image after image."""

    def __init__(self, model: ModelFiles, settings: Settings, threads: int, plan: Plan,
                 base: tuple[str, ...], recorded: list[Any]) -> None:
        import ray

        import edge_vlm
        from edge_vlm.batch.identity import verify
        from edge_vlm.preflight import open_store

        name, mmproj = verify(model, open_store(settings))
        runtime = settings.runtime.model_copy(update={"threads": threads})
        self.vlm: VLM = edge_vlm.load(name, mmproj,
                                      settings=settings.model_copy(update={"runtime": runtime}))
        self.plan = plan
        self.base = base
        self.recorded = _Snapshot(ray.get(recorded[0]))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out_i: list[int] = []
        out: list[bytes] = []
        for n, i in enumerate(batch["i"]):
            item = BatchItem(Path(str(batch["path"][n])),
                             tuple(str(p) for p in batch["prompts"][n]))
            data = bytes(batch["data"][n])
            error = bytes(batch["error"][n])
            if error:
                image = ImageInput(os.path.abspath(item.path), None, _unpickle_error(error))
            else:
                image = ImageInput(_data_url(data), str(batch["sha256"][n]))
            results = list(answer_image(self.vlm, int(i), item,
                                        prompts_of(item, self.base, self.plan), self.plan,
                                        image, self.recorded))
            out_i.append(int(i))
            out.append(pickle.dumps(results))
        return {"i": out_i, "results": out}


def _unpickle_error(data: bytes) -> BatchError:
    err = pickle.loads(data)
    assert isinstance(err, BatchError)
    return err


def _data_url(data: bytes) -> str:
    """The image bytes as a ``data:`` URL: workers need not see the driver's files."""
    from edge_vlm.images import sniff_format

    fmt = sniff_format(data).lower()
    mime = f"image/{fmt}" if fmt.isalpha() else "image/unknown"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

"""One entry point for both batch engines: :func:`run` on this machine or on Ray Data."""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from edge_vlm.batch.inputs import BatchInputError, BatchItem
from edge_vlm.batch.options import BatchOptions, make_plan, prepare_items
from edge_vlm.batch.output import ResultWriter
from edge_vlm.batch.results import BatchResult

if TYPE_CHECKING:
    from edge_vlm.api import VLM
    from edge_vlm.batch.raydata import RayOptions
    from edge_vlm.config import Settings

Engine = Literal["local", "ray"]


def run(
    items: Iterable[str | os.PathLike[str] | BatchItem],
    prompts: Sequence[str] = (),
    *,
    model: str | Path | None = None,
    mmproj: str | Path | None = None,
    settings: Settings | None = None,
    options: BatchOptions | None = None,
    out: str | os.PathLike[str] | ResultWriter | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop: threading.Event | None = None,
    engine: Engine = "local",
    ray: RayOptions | None = None,
) -> Generator[BatchResult, None, None]:
    """Ask every prompt about every image, on this machine or on Ray Data.

    ``engine="local"`` loads the model here and runs :func:`~edge_vlm.batch.runner.batch`;
    ``engine="ray"`` runs the same per-image work on Ray actors (a local Ray, or the
    cluster named in ``ray.address``), each loading the model once, while this process
    writes the results file. Both yield the same results and write the same lines (on Ray
    in the order images finish; each line names its ``path`` and ``prompt_index``).

    ```python
    from edge_vlm.batch import BatchOptions, RayOptions, discover, run

    items = discover(["photos/"], recursive=True)
    for r in run(items, ["Describe the image."], out="captions.jsonl", resume=True,
                 options=BatchOptions(max_tokens=64), engine="ray",
                 ray=RayOptions(workers=4, threads_per_worker=2)):
        print(r.path, r.answer if r.ok else r.error)
    ```

    Args:
        items: Image paths, or :class:`~edge_vlm.batch.BatchItem` with prompts of their own.
        prompts: Questions asked of every image.
        model: ``default``, an installed model's name or a GGUF path (None: the settings').
        mmproj: The vision projector of a model given by path.
        settings: Settings (default: :func:`~edge_vlm.config.load_settings`).
        options: How to ask (:class:`~edge_vlm.batch.options.BatchOptions`).
        out: A ``.jsonl`` path or an open :class:`~edge_vlm.batch.ResultWriter`.
        resume: With ``out``: skip the answers already there, retry the failed ones.
        overwrite: With ``out``: empty an existing file first.
        stop: Set it to stop after the current answer (local) or image (Ray).
        engine: ``local`` or ``ray``.
        ray: Where and how wide the Ray engine runs (default: a local Ray, one worker).

    Returns:
        An iterator of results; the model is loaded (or Ray started) before it is returned
        for the local engine, on the first ``next()`` for Ray. Iterate it to the end (or
        ``close()`` it) to release the model and Ray.

    Raises:
        BatchInputError: bad items, prompts, schema or options, before any work; Ray
            asked for but not installed.
        ModelNotFoundError: the model cannot be found.
    """
    from edge_vlm.config import load_settings

    s = settings if settings is not None else load_settings()
    opts = options or BatchOptions()
    name = model if model is not None else s.model.default
    proj = mmproj if mmproj is not None else s.model.mmproj
    if engine == "local":
        if ray is not None:
            raise BatchInputError("ray options were given but engine is 'local'; "
                                  "pass engine='ray' to use them")
        import edge_vlm
        from edge_vlm.batch.runner import batch

        vlm = edge_vlm.load(name, proj, settings=s)
        try:
            results = batch(vlm, items, prompts, options=opts, out=out, resume=resume,
                            overwrite=overwrite, stop=stop)
        except BaseException:
            vlm.close()
            raise
        return _closing(vlm, results)
    if engine != "ray":
        raise BatchInputError(f"unknown batch engine {engine!r}; use 'local' or 'ray'")
    from edge_vlm.batch.identity import identify
    from edge_vlm.batch.raydata import RayOptions, import_ray, run_ray
    from edge_vlm.preflight import open_store

    import_ray()  # fail now, with the extra to install, not on the first next()
    todo, base = prepare_items(items, prompts)
    files = identify(name, proj, store=open_store(s))
    plan = make_plan(opts, s, files.key)
    owned = out is not None and not isinstance(out, ResultWriter)
    writer = out if isinstance(out, ResultWriter) or out is None else (
        ResultWriter.open(out, resume=resume, overwrite=overwrite))
    results = run_ray(todo, base, plan, files, s, ray or RayOptions(), writer, stop)
    return _closing(writer if owned else None, results)


def _closing(owned: VLM | ResultWriter | None,
             results: Iterator[BatchResult]) -> Generator[BatchResult, None, None]:
    try:
        yield from results
    finally:
        if owned is not None:
            owned.close()

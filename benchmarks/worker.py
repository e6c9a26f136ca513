"""One system running one scenario once, in its own process (so its peak RSS is its own).

Run by ``benchmarks/run.py``; by hand::

    python benchmarks/worker.py --system edge --scenario a --model M --mmproj P \\
        --inputs benchmarks/results/inputs --out /tmp/r.json

Every request is timed the same way from the client side for all systems: the clock starts
when the request is made (images not yet read) and ``ttft_ms`` is the arrival of the first
generated text; decode speed is ``(tokens - 1) / (end - first token)``. Vision-encoder and
prefill times come from each system's own counters: edge-vlm's ``timings``; for
``MTMDChatHandler``, libmtmd's log lines and llama.cpp's perf counters; for
``llama-mtmd-cli``, the same log lines and its perf report (see :mod:`mtmd_cli`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inputs import BenchInputs, make_inputs
from mtmd_cli import log_figures
from scenarios import (
    BATCH_PROMPTS,
    FOLLOW_UP_QUESTION,
    FOLLOW_UP_SYSTEM,
    QUESTION,
    SCENARIOS,
    TURNS,
    TWO_IMAGES_QUESTION,
)

Request = dict[str, Any]
Messages = list[dict[str, Any]]


def user(images: list[Path], text: str, detail: str | None) -> dict[str, Any]:
    """A user message with images first (as SmolVLM's examples put them), then the text."""
    parts: list[dict[str, Any]] = []
    for img in images:
        url: dict[str, Any] = {"url": img.resolve().as_uri()}
        if detail is not None:
            url["detail"] = detail
        parts.append({"type": "image_url", "image_url": url})
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def assistant(text: str) -> dict[str, Any]:
    # A list of parts: SmolVLM's template iterates over the content (a string would be
    # iterated character by character and vanish).
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def system(text: str) -> dict[str, Any]:
    return {"role": "system", "content": [{"type": "text", "text": text}]}


def peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM; ``ru_maxrss`` would include the RSS the
    parent had when it forked us)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _decode_tps(n_tokens: int, t_first: float | None, t_end: float) -> float:
    if t_first is None or n_tokens < 2 or t_end <= t_first:
        return 0.0
    return (n_tokens - 1) / (t_end - t_first)


# -- edge-vlm ------------------------------------------------------------------------------


class EdgeClient:
    """edge-vlm through its public Python API."""

    name = "edge"

    def __init__(self, args: argparse.Namespace) -> None:
        import edge_vlm

        t0 = time.perf_counter()
        from edge_vlm.config import load_settings

        # The scenario's detail level is configured (`images.detail`), as a user who wants
        # that level sets it: the vision context is made for it at load, not rebuilt by the
        # first request (a level switch re-reads the mmproj: 0.65 s for a 1.3 GB one).
        detail = SCENARIOS[args.scenario].detail
        settings = load_settings().with_overrides({"images.detail": detail})
        # --threads 0: edge-vlm's default (runtime.threads unset: it follows the load).
        self.vlm = edge_vlm.load(args.model, args.mmproj, settings=settings,
                                 threads=args.threads or None,
                                 n_ctx=args.n_ctx, flash_attn=args.edge_flash_attn)
        self.load_s = time.perf_counter() - t0
        self.max_tokens = args.max_tokens
        self.info = {"flash_attn": args.edge_flash_attn,
                     "threads": args.threads or "auto (follows the load)"}

    def ask(self, messages: Messages, max_tokens: int | None = None) -> tuple[Request, str]:
        t0 = time.perf_counter()
        t_first: float | None = None
        text: list[str] = []
        stats = None
        finish = None
        for chunk in self.vlm.chat(messages, stream=True, temperature=0,
                                   max_tokens=max_tokens or self.max_tokens):
            now = time.perf_counter()
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.delta.content:
                t_first = t_first or now
                text.append(choice.delta.content)
            if choice.finish_reason is not None:
                stats, finish = chunk.timings, choice.finish_reason
        t_end = time.perf_counter()
        assert stats is not None
        n = stats.completion_tokens
        prefill_ms = max(0.0, stats.prompt_eval_ms - stats.image_encode_ms)
        # The first token, visible or not: a random-weight model may sample tokens that
        # print nothing (control or byte tokens), which llama-mtmd-cli writes out as bytes.
        # The engine's own clock starts inside this call and stops at the first token.
        visible = t_first
        if stats.ttft_ms and (t_first is None or t0 + stats.ttft_ms / 1000.0 < t_first):
            t_first = t0 + stats.ttft_ms / 1000.0
        ttft_ms = ((t_first or t_end) - t0) * 1000.0
        req: Request = {
            "ttft_ms": ttft_ms,
            "visible_ttft_ms": ((visible or t_end) - t0) * 1000.0,
            "total_ms": (t_end - t0) * 1000.0,
            "decode_tps": _decode_tps(n, t_first, t_end),
            "completion_tokens": n,
            "finish_reason": finish,
            "image_decode_ms": stats.image_decode_ms,
            "pre_ms": max(0.0, ttft_ms - stats.prompt_eval_ms),
            "encode_ms": stats.image_encode_ms,
            "prefill_ms": prefill_ms,
            "prefill_tokens": stats.prompt_tokens_evaluated,
            "prefill_tps": (stats.prompt_tokens_evaluated / (prefill_ms / 1000.0)
                            if prefill_ms > 0 else 0.0),
            "prompt_tokens": stats.prompt_tokens,
            "image_tokens": stats.image_tokens,
            "tokens_reused": stats.prompt_tokens_reused,
            "cache_hits": stats.embedding_cache_hits,
            "passes": sum(im.encoded for im in stats.images),
            "internal_ttft_ms": stats.ttft_ms,
            "internal_decode_tps": stats.decode_tps,
            "threads_at_end": list(self.vlm.engine.backend.n_threads),
        }
        advisor = self.vlm.engine.threads
        if advisor is not None and advisor.last_others is not None:
            req["others_cores_seen"] = advisor.last_others
        return req, "".join(text)

    def batch(self, images: list[Path], prompts: tuple[str, ...], max_tokens: int,
              detail: str) -> Request:
        """edge-vlm's batch API when present (else the same loop over ``chat``)."""
        run_batch: Any
        try:
            from edge_vlm.batch import batch as run_batch
        except ImportError:
            run_batch = None
        t0 = time.perf_counter()
        answers = encodes = 0
        tokens = 0
        if run_batch is not None:
            via = "edge_vlm.batch"
            for r in run_batch(self.vlm, images, prompts, max_tokens=max_tokens,
                               temperature=0, detail=detail):
                if r.status != "ok":
                    raise RuntimeError(f"batch item failed: {r.error}")
                answers += 1
                if r.timings is not None:
                    tokens += r.timings.completion_tokens
                    encodes += r.timings.image_encode_ms > 0
        else:
            via = "vlm.chat loop"
            for img in images:
                for p in prompts:
                    req, _ = self.ask([user([img], p, detail)], max_tokens)
                    answers += 1
                    tokens += req["completion_tokens"]
                    encodes += req["encode_ms"] > 0
        return _batch_result(images, answers, tokens, time.perf_counter() - t0,
                             via=via, encodes=encodes)


# -- llama-cpp-python MTMDChatHandler -----------------------------------------------------


class StderrTap:
    """Route this process's fd 2 through a pipe read by a thread that timestamps what
    llama.cpp logs, so a request's log lines (and when they came) can be read back."""

    def __init__(self) -> None:
        self.saved = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.chunks: list[tuple[float, bytes]] = []
        self._seen = threading.Condition()
        self._mark = 0
        threading.Thread(target=self._pump, args=(read_fd,), daemon=True).start()

    def _pump(self, fd: int) -> None:
        while data := os.read(fd, 65536):
            with self._seen:
                self.chunks.append((time.perf_counter(), data))
                self._seen.notify_all()

    def take(self) -> list[tuple[float, bytes]]:
        """Everything logged since the last call, with arrival times."""
        sys.stderr.flush()
        self._mark += 1
        sentinel = f"\n@@tap{self._mark}@@\n".encode()
        os.write(2, sentinel)
        with self._seen:
            self._seen.wait_for(lambda: any(sentinel in d for _, d in self.chunks[-4:]),
                                timeout=5.0)
            taken, self.chunks = self.chunks, []
        return taken

    def say(self, msg: str) -> None:
        os.write(self.saved, (msg + "\n").encode())


class HandlerClient:
    """llama-cpp-python's own multimodal path: ``Llama`` + ``MTMDChatHandler``.

    Llama's defaults except threads (set, as for the other systems) and the context size;
    flash attention is llama-cpp-python's default (off) unless ``--handler-flash-attn on``.
    ``verbose=True`` so that libmtmd logs its per-slice timings (read from fd 2).
    """

    name = "handler"

    def __init__(self, args: argparse.Namespace, tap: StderrTap) -> None:
        import llama_cpp
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import MTMDChatHandler

        self.llama_cpp = llama_cpp
        self.tap = tap
        t0 = time.perf_counter()
        handler = MTMDChatHandler(clip_model_path=str(args.mmproj), verbose=True)
        # --threads 0: Llama's default (half the logical CPUs).
        self.llm = Llama(model_path=str(args.model), chat_handler=handler, n_ctx=args.n_ctx,
                         n_threads=args.threads or None,
                         n_threads_batch=args.threads or None,
                         flash_attn=args.handler_flash_attn == "on", verbose=True)
        self.load_s = time.perf_counter() - t0
        self.max_tokens = args.max_tokens
        self.info = {"flash_attn": args.handler_flash_attn}
        tap.take()

    def ask(self, messages: Messages, max_tokens: int | None = None) -> tuple[Request, str]:
        lc = self.llama_cpp
        ctx = self.llm._ctx.ctx
        lc.llama_perf_context_reset(ctx)
        self.tap.take()
        t0 = time.perf_counter()
        t_first: float | None = None
        text: list[str] = []
        n = 0
        finish = None
        stream: Iterator[Any] = self.llm.create_chat_completion(  # type: ignore[assignment]
            messages=messages,  # type: ignore[arg-type]
            stream=True, temperature=0.0, repeat_penalty=1.0,
            max_tokens=max_tokens or self.max_tokens)
        for chunk in stream:
            now = time.perf_counter()
            choice = chunk["choices"][0]
            content = choice["delta"].get("content")
            if content:
                t_first = t_first or now
                text.append(content)
                n += 1
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
        t_end = time.perf_counter()
        perf = lc.llama_perf_context(ctx)
        figs = log_figures(self.tap.take())
        n_gen = max(n, int(perf.n_eval))
        visible = t_first
        # Tokens that print nothing stream no chunk: the first token then came before the
        # time llama.cpp spent evaluating the generated ones (its perf counters).
        if perf.n_eval and perf.t_eval_ms > 0:
            first = t_end - perf.t_eval_ms / 1000.0
            if t_first is None or first < t_first:
                t_first = max(t0, first)
        ttft_ms = ((t_first or t_end) - t0) * 1000.0
        # Before the first encode: reading, decoding and preprocessing the images (and the
        # few text tokens before the first image). After the encodes: the language model.
        pre_ms = ((figs["t_first_encode"] - t0) * 1000.0
                  if figs["t_first_encode"] is not None else 0.0)
        prefill_ms = max(0.0, ttft_ms - pre_ms - figs["encode_ms"])
        prefill_tokens = int(perf.n_p_eval)
        req: Request = {
            "ttft_ms": ttft_ms,
            "visible_ttft_ms": ((visible or t_end) - t0) * 1000.0,
            "total_ms": (t_end - t0) * 1000.0,
            "decode_tps": _decode_tps(n_gen, t_first, t_end),
            "completion_tokens": n_gen,
            "finish_reason": finish,
            "pre_ms": pre_ms,
            "encode_ms": figs["encode_ms"],
            "prefill_ms": prefill_ms,
            "prefill_tokens": prefill_tokens,
            "prefill_tps": prefill_tokens / (prefill_ms / 1000.0) if prefill_ms > 0 else 0.0,
            "prompt_tokens": prefill_tokens,
            "passes": figs["passes"],
            "image_prefill_ms": figs["image_prefill_ms"],
            "internal_decode_tps": (perf.n_eval / (perf.t_eval_ms / 1000.0)
                                    if perf.t_eval_ms > 0 else 0.0),
        }
        return req, "".join(text)

    def batch(self, images: list[Path], prompts: tuple[str, ...], max_tokens: int,
              detail: str) -> Request:
        t0 = time.perf_counter()
        answers = tokens = 0
        for img in images:
            for p in prompts:
                req, _ = self.ask([user([img], p, None)], max_tokens)
                answers += 1
                tokens += req["completion_tokens"]
        return _batch_result(images, answers, tokens, time.perf_counter() - t0,
                             via="loop over create_chat_completion", encodes=answers)


def _batch_result(images: list[Path], answers: int, tokens: int, seconds: float, *,
                  via: str, encodes: int) -> Request:
    return {
        "images": len(images),
        "answers": answers,
        "seconds": seconds,
        "images_per_min": len(images) * 60.0 / seconds if seconds > 0 else 0.0,
        "completion_tokens": tokens,
        "answers_that_encoded": encodes,
        "via": via,
    }


# -- scenarios -----------------------------------------------------------------------------


def run_scenario(client: Any, key: str, inp: BenchInputs, args: argparse.Namespace,
                 say: Callable[[str], None]) -> dict[str, Request]:
    """Run one scenario; returns its measured requests by name (``main``, ``turn2`` ...)."""
    detail = SCENARIOS[key].detail if client.name == "edge" else None
    out: dict[str, Request] = {}
    if key in ("a", "a-low", "a-auto"):
        out["main"], _ = client.ask([user([inp.square], QUESTION, detail)])
    elif key in ("b", "b-low", "b-auto"):
        out["main"], _ = client.ask([user([inp.photo], QUESTION, detail)])
    elif key == "e":
        out["main"], _ = client.ask([user([inp.square, inp.square2], TWO_IMAGES_QUESTION,
                                          detail)])
    elif key == "c":
        messages: Messages = []
        for i, q in enumerate(TURNS, 1):
            messages.append(user([inp.square], q, detail) if i == 1 else
                            {"role": "user", "content": [{"type": "text", "text": q}]})
            req, answer = client.ask(messages)
            out[f"turn{i}"] = req
            messages.append(assistant(answer))
            say(f"  turn {i}: TTFT {req['ttft_ms'] / 1000:.2f} s")
    elif key == "d":
        out["cold"], _ = client.ask([user([inp.square], QUESTION, detail)])
        say(f"  first conversation: TTFT {out['cold']['ttft_ms'] / 1000:.2f} s")
        out["main"], _ = client.ask([system(FOLLOW_UP_SYSTEM),
                                     user([inp.square], FOLLOW_UP_QUESTION, detail)])
    elif key == "d-sys":
        # The same system prompt and image as a first conversation, with another
        # conversation in between (the live KV cache then holds that one).
        out["cold"], _ = client.ask([system(FOLLOW_UP_SYSTEM),
                                     user([inp.square], QUESTION, detail)])
        out["between"], _ = client.ask([user([inp.square2], QUESTION, detail)])
        out["main"], _ = client.ask([system(FOLLOW_UP_SYSTEM),
                                     user([inp.square], FOLLOW_UP_QUESTION, detail)])
    elif key == "alt":
        convs: dict[str, Messages] = {"a": [], "b": []}
        images = {"a": inp.square, "b": inp.square2}
        for turn, q in enumerate(TURNS[:3], 1):
            for name, messages in convs.items():
                messages.append(user([images[name]], q, detail) if turn == 1 else
                                {"role": "user", "content": [{"type": "text", "text": q}]})
                req, answer = client.ask(messages)
                out[f"{name}{turn}"] = req
                messages.append(assistant(answer))
                say(f"  conversation {name}, turn {turn}: TTFT {req['ttft_ms'] / 1000:.2f} s")
        follow_ups = [out[k] for k in ("a2", "b2", "a3", "b3")]
        out["main"] = max(follow_ups, key=lambda r: r["ttft_ms"])
    elif key == "batch":
        out["main"] = client.batch(inp.batch, BATCH_PROMPTS, args.batch_max_tokens,
                                   detail or "high")
    else:
        raise SystemExit(f"unknown scenario {key!r}")
    return out


def _print_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", required=True, choices=("edge", "handler", "cli"))
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--mmproj", required=True, type=Path)
    ap.add_argument("--inputs", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2,
                    help="0: each system's default (edge-vlm: follows the load; "
                         "llama-mtmd-cli -t 0: every hardware thread; Llama: half of them)")
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-images", type=int, default=3)
    ap.add_argument("--batch-max-tokens", type=int, default=32)
    ap.add_argument("--edge-flash-attn", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--handler-flash-attn", default="off", choices=("on", "off"))
    ap.add_argument("--cli", type=Path, help="llama-mtmd-cli binary (system cli)")
    args = ap.parse_args(argv)

    inp = make_inputs(args.inputs, batch_images=args.batch_images)
    result: dict[str, Any] = {"system": args.system, "scenario": args.scenario}
    say: Callable[[str], None] = _print_err
    if args.system == "cli":
        from mtmd_cli import run_cli_scenario

        result.update(run_cli_scenario(args, inp, say))
    else:
        client: Any
        if args.system == "handler":
            tap = StderrTap()
            say = tap.say
            client = HandlerClient(args, tap)
        else:
            client = EdgeClient(args)
        say(f"  loaded in {client.load_s:.1f} s")
        result["load_s"] = client.load_s
        result["config"] = client.info
        result["requests"] = run_scenario(client, args.scenario, inp, args, say)
        result["peak_rss_mb"] = peak_rss_mb()
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

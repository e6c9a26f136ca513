"""How much memory a model pair needs at a context size, before loading it.

The parts, as llama.cpp and libmtmd allocate them on the CPU backend:

- language-model weights: the file, memory-mapped (every page is read while decoding);
- repacked weights: on the CPU backend llama.cpp copies the weight matrices of some
  quantized types (Q4_0, Q4_K, IQ4_NL on x86 with AVX2; also Q5_K, Q6_K, Q8_0 on ARM with
  dot-product instructions) into an interleaved layout in anonymous memory, and the mapped
  pages it read them from stay resident too: those matrices count twice (Gemma 3 4B at
  Q4_K_M: 1.46 GB of its 2.37 GB file);
- mmproj weights: the file, read into memory by libmtmd;
- KV cache: layers x KV heads x (key + value head size) x cells x 2 bytes (f16), where a
  sliding-window layer (Gemma 3) has only window + ``n_ubatch`` cells unless
  ``runtime.swa_full`` is on;
- mmproj copies: one. The backend keeps a single libmtmd context (``Backend.mtmd_for``);
  a request at another detail level of a tiling projector (SmolVLM...) frees it before
  the context for that level loads, so the weights are never held twice;
- language-model compute buffer: llama.cpp reserves the graph of one ``n_ubatch`` batch
  with every position's logits (``n_vocab`` floats each) and the feed-forward activations;
  without flash attention the attention scores (context x batch x heads floats) reuse the
  logits' memory, so the larger of the two counts;
- vision compute buffer: one encoder pass at the encoder's input size (a tile for tiling
  projectors): activations of every patch, plus patch x patch x heads scores without flash
  attention;
- a fixed overhead: the Python interpreter, numpy, Pillow, llama.cpp's code and threads.

Compute buffers are counted whole although only part of them is ever touched: the
estimate errs high, by 5-10% on the SmolVLM-256M shape-alike (measured against peak RSS,
see the store issue's closing note; ``tests/test_store.py`` checks the tiny model).
GPU offload moves weights and KV to VRAM, which psutil cannot see: the estimate then says
so instead of judging.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_vlm.gguf.constants import DYNAMIC_LOW_TOKENS, DYNAMIC_PROJECTORS
from edge_vlm.store.manifest import ModelFacts, human_size

if TYPE_CHECKING:
    from edge_vlm.config import Settings
    from edge_vlm.store.catalog import CatalogEntry, CatalogFile

MiB = 1024 * 1024
OVERHEAD = 64 * MiB
"""Resident memory of the process before the model: interpreter, numpy, Pillow, llama.cpp."""
TIGHT = 0.85
"""Above this share of the available memory the verdict is "tight"."""
DEFAULT_CTX_CAP = 8192
"""The context the backend uses when none is configured (capped training context)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated resident memory of a loaded pair, in bytes, and whether it fits.

    Attributes:
        weights: Language-model file (memory-mapped).
        repacked: Weight matrices the CPU backend copies into its own layout.
        mmproj: Vision projector weights, all copies (see :attr:`mmproj_copies`).
        kv_cache: KV cache at ``n_ctx``.
        compute: Language-model compute buffer.
        vision_compute: Vision-encoder compute buffer.
        overhead: Process overhead.
        n_ctx: The context size estimated for.
        available: Memory available now (psutil), bytes.
        max_ctx: Largest context that fits in ``available`` (0: not even the weights).
        gpu: GPU offload is on (the estimate is for RAM only and not judged).
        mmproj_copies: libmtmd contexts holding the mmproj weights (the backend keeps one
            at a time, so 1).
    """

    weights: int
    mmproj: int
    kv_cache: int
    compute: int
    vision_compute: int
    overhead: int
    n_ctx: int
    available: int
    max_ctx: int
    gpu: bool = False
    mmproj_copies: int = 1
    repacked: int = 0

    @property
    def total(self) -> int:
        """All parts."""
        return (self.weights + self.repacked + self.mmproj + self.kv_cache + self.compute
                + self.vision_compute + self.overhead)

    @property
    def verdict(self) -> str:
        """``fits``, ``tight`` or ``won't fit`` (``unknown`` with GPU offload)."""
        if self.gpu:
            return "unknown"
        if self.total <= TIGHT * self.available:
            return "fits"
        return "tight" if self.total <= self.available else "won't fit"

    def summary(self) -> str:
        """One line: total, verdict, available, largest context."""
        line = (f"~{human_size(self.total)} at {self.n_ctx} tokens of context: {self.verdict} "
                f"({human_size(self.available)} available")
        if self.verdict != "fits" and not self.gpu:
            line += f"; the largest context that fits is {self.max_ctx}" if self.max_ctx else (
                "; the weights alone do not fit")
        return line + ")"

    def breakdown(self) -> list[tuple[str, int]]:
        """(label, bytes) of each part, for ``models show``."""
        return [
            ("language-model weights (mmap)", self.weights),
            *([("weights repacked for the CPU", self.repacked)] if self.repacked else []),
            ("mmproj weights" + (f" (x{self.mmproj_copies}, one per detail level)"
                                 if self.mmproj_copies > 1 else ""), self.mmproj),
            (f"KV cache ({self.n_ctx} tokens, f16)", self.kv_cache),
            ("language-model compute buffer", self.compute),
            ("vision-encoder compute buffer", self.vision_compute),
            ("process overhead", self.overhead),
        ]


def _available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def kv_bytes_per_token(f: ModelFacts) -> int:
    """f16 K+V bytes per context position, all layers."""
    return f.n_layer * f.n_head_kv * (f.head_dim_k + f.head_dim_v) * 2


def kv_cache_bytes(f: ModelFacts, n_ctx: int, n_ubatch: int, swa_full: bool) -> int:
    """The KV cache at ``n_ctx``: a sliding-window layer keeps the window plus one batch
    (rounded up to 256 cells, as llama.cpp's iSWA cache) unless ``swa_full``."""
    if not f.n_layer:
        return 0
    per_layer = kv_bytes_per_token(f) // f.n_layer
    swa = 0 if swa_full or not f.sliding_window else min(f.swa_layers, f.n_layer)
    swa_cells = min(n_ctx, -(-(f.sliding_window + n_ubatch) // 256) * 256)
    return per_layer * ((f.n_layer - swa) * n_ctx + swa * swa_cells)


#: ggml types whose weight matrices the CPU backend repacks, by machine (ggml-cpu's
#: ``repack.cpp``; a CPU without AVX2 / dot-product support repacks less: the estimate
#: then errs high).
_REPACKED = {
    "x86": frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}),
    "arm": frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"}),
}


def repacked_bytes(f: ModelFacts, machine: str | None = None) -> int:
    """Bytes of weight matrices the CPU backend copies into its interleaved layout."""
    m = (machine if machine is not None else platform.machine()).lower()
    kind = ("x86" if m in {"x86_64", "amd64", "i686", "x86"} else
            "arm" if m.startswith(("arm", "aarch64")) else "")
    types = _REPACKED.get(kind, frozenset())
    return sum(n for t, n in f.matmul_bytes.items() if t in types)


def lm_compute_bytes(f: ModelFacts, n_ctx: int, n_ubatch: int, flash_attn: bool) -> int:
    """The language model's compute buffer for one ``n_ubatch`` batch."""
    widest = max(f.n_vocab, 0 if flash_attn else n_ctx * f.n_head)  # they share memory
    return n_ubatch * 4 * (widest + 4 * f.embedding_width + 2 * f.n_ff)


#: libmtmd's largest image-token count per dynamic-resolution projector (``clip.cpp``'s
#: ``set_limit_image_tokens``), the image it reserves the encoder's compute buffer for
#: whatever the image (``set_warmup_n_tokens``; reserved on the first encode even with
#: warm-up off), and how many encoder patches make one token (Qwen-VL merges 2x2).
_DYNAMIC_MAX_TOKENS = {"qwen2vl_merger": 4096, "qwen2.5vl_merger": 4096,
                       "qwen3vl_merger": 4096, "pixtral": 1024}
_RESERVED_TOKENS = {"qwen2vl_merger": 46 * 46, "qwen2.5vl_merger": 46 * 46,
                    "qwen3vl_merger": 46 * 46, "pixtral": 256}
_PATCHES_PER_TOKEN = {"qwen2vl_merger": 4, "qwen2.5vl_merger": 4, "qwen3vl_merger": 4}


def vision_compute_bytes(f: ModelFacts, flash_attn: bool, detail: str = "auto",
                         gpu: bool = False) -> int:
    """The vision encoder's compute buffer for one pass at its input size.

    A dynamic-resolution projector (Qwen-VL, Pixtral) has no fixed input size: libmtmd
    reserves the buffer for a fixed size (46x46 tokens for Qwen-VL), or for the largest
    pass the detail level allows when that is larger (``low``, and ``auto`` on a CPU:
    :data:`DYNAMIC_LOW_TOKENS`; otherwise libmtmd's maximum).
    """
    side = f.image_size or 224
    patches = (side // f.patch_size) ** 2 if f.patch_size else 256
    if f.projector_type in DYNAMIC_PROJECTORS and f.patch_size:
        low = detail == "low" or (detail == "auto" and not gpu)
        tokens = (DYNAMIC_LOW_TOKENS if low
                  else _DYNAMIC_MAX_TOKENS.get(f.projector_type, 1024))
        tokens = max(tokens, _RESERVED_TOKENS.get(f.projector_type, 0))
        patches = tokens * _PATCHES_PER_TOKEN.get(f.projector_type, 1)
        side = int(patches ** 0.5) * f.patch_size
    width = f.vision_width or 1024
    ff = f.vision_ff or 4 * width
    acts = 4 * patches * (3 * width + ff) + 2 * 4 * side * side * 3
    if flash_attn:
        return acts
    return 4 * patches * patches * (f.vision_heads or 16) + acts // 2


def estimate(facts: ModelFacts, model_bytes: int, mmproj_bytes: int, *, n_ctx: int | None,
             n_ubatch: int = 512, flash_attn: bool = True, gpu: bool = False,
             detail: str = "auto", swa_full: bool = False,
             available: int | None = None) -> MemoryEstimate:
    """Estimate the memory of a pair from its facts and file sizes.

    Args:
        facts: From the GGUF headers.
        model_bytes: Language-model file size.
        mmproj_bytes: mmproj file size.
        n_ctx: Context size; None: the training context, at most 8192 (as the backend).
        n_ubatch: Prompt batch (``runtime.n_batch``).
        flash_attn: Whether flash attention will be on (``auto`` is on for the CPU).
        gpu: GPU offload is on.
        detail: ``images.detail`` (the detail level the vision context is made for).
        swa_full: ``runtime.swa_full`` (a full-size cache for sliding-window layers).
        available: Memory to compare with (default: psutil's available memory).
    """
    ctx = n_ctx or min(facts.context_length or DEFAULT_CTX_CAP, DEFAULT_CTX_CAP)
    ubatch = min(n_ubatch, ctx)
    avail = _available() if available is None else available
    # The backend keeps one vision context whatever the detail levels requested (it frees
    # it and loads another on a change of level): one copy of the mmproj weights. Measured
    # on the SmolVLM-256M shape-alike at full detail: estimate 696 MiB, peak 672 MiB.
    copies = 1
    repacked = 0 if gpu else repacked_bytes(facts)
    # Sliding-window layers hold a fixed number of cells once the context passes the
    # window: only the other layers grow with the context.
    window = kv_cache_bytes(facts, 1 << 30, ubatch, swa_full) - kv_cache_bytes(
        facts, (1 << 30) - 1, ubatch, swa_full)
    swa_fixed = kv_cache_bytes(facts, 1 << 30, ubatch, swa_full) - window * (1 << 30)
    fixed = (model_bytes + repacked + copies * mmproj_bytes
             + vision_compute_bytes(facts, flash_attn, detail, gpu) + OVERHEAD + swa_fixed)
    per_token = window + (0 if flash_attn else 4 * ubatch * facts.n_head)
    base_compute = lm_compute_bytes(facts, 0, ubatch, True)
    room = avail - fixed - base_compute
    max_ctx = 0
    if room > 0 and per_token:
        max_ctx = int(room // per_token) // 256 * 256
        if facts.context_length:
            max_ctx = min(max_ctx, facts.context_length)
    return MemoryEstimate(
        weights=model_bytes,
        repacked=repacked,
        mmproj=copies * mmproj_bytes,
        kv_cache=kv_cache_bytes(facts, ctx, ubatch, swa_full),
        compute=lm_compute_bytes(facts, ctx, ubatch, flash_attn),
        vision_compute=vision_compute_bytes(facts, flash_attn, detail, gpu),
        overhead=OVERHEAD,
        n_ctx=ctx,
        available=avail,
        max_ctx=max_ctx,
        gpu=gpu,
        mmproj_copies=copies,
    )


def estimate_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of :func:`estimate` that the settings decide (``n_ctx``
    included)."""
    rt = settings.runtime
    # "auto" flash attention is on for the CPU backend; GPU "auto" depends on the build,
    # which only the backend knows: count it as offloaded only when forced on.
    return {"n_ubatch": rt.n_batch, "flash_attn": rt.flash_attn != "off",
            "gpu": rt.gpu == "on", "detail": settings.images.detail, "n_ctx": rt.n_ctx,
            "swa_full": rt.swa_full}


def estimate_files(model: Path, mmproj: Path, settings: Settings,
                   n_ctx: int | None = None) -> MemoryEstimate:
    """Estimate for two GGUF files (headers only are read).

    Raises:
        ModelLoadError: a file is not a readable GGUF.
    """
    from edge_vlm.gguf.reader import read_gguf
    from edge_vlm.store.manifest import facts_from

    facts = facts_from(read_gguf(model), read_gguf(mmproj))
    rt = estimate_options(settings)
    ctx = rt.pop("n_ctx")
    return estimate(facts, model.stat().st_size, mmproj.stat().st_size, n_ctx=n_ctx or ctx,
                    **rt)


def estimate_catalog(entry: CatalogEntry, file: CatalogFile, settings: Settings,
                     n_ctx: int | None = None) -> MemoryEstimate:
    """A rougher estimate for a catalog model before download (sizes and KV shape only)."""
    rt = estimate_options(settings)
    ctx = rt.pop("n_ctx")
    head = entry.head_dim
    facts = ModelFacts(
        context_length=entry.context, n_layer=entry.layers, n_head_kv=entry.kv_heads,
        head_dim_k=head, head_dim_v=head, n_head=entry.kv_heads * 4,
        n_vocab=150_000, embedding_width=4096, n_ff=12_288,  # pessimistic: large vocabularies
        image_size=448, patch_size=14, vision_width=1152, vision_ff=4304, vision_heads=16,
    )
    return estimate(facts, file.size, entry.mmproj.size, n_ctx=n_ctx or ctx, **rt)


def memory_warning(model: Path, mmproj: Path, settings: Settings) -> str | None:
    """A warning line when a pair will not fit in memory now, else None (for run/chat/serve)."""
    try:
        est = estimate_files(model, mmproj, settings)
    except Exception:  # the loader reports unreadable files itself, better worded
        return None
    if est.verdict != "won't fit":
        return None
    advice = (f"lower the context (--n-ctx {est.max_ctx})" if est.max_ctx >= 256
              else "use a smaller or more quantized model")
    return (f"model '{model.name}' needs ~{human_size(est.total)} at {est.n_ctx} tokens of "
            f"context but only {human_size(est.available)} is available: {advice}, or close "
            "other programs")

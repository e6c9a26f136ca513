"""Load a model pair: resolve, validate the untrusted files, check the pair, then llama.cpp.

The GGUF files are read with edge-vlm's own bounded parser before llama.cpp sees them: a
missing mmproj tensor crashes llama.cpp with SIGSEGV, and a mismatched pair only shows up
as a log line there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_vlm.config import Settings, cache_dir
from edge_vlm.cpuload import ThreadAdvisor, machine_load
from edge_vlm.diskcache import DiskEmbeddingCache
from edge_vlm.engine import Engine
from edge_vlm.errors import ModelMismatchError
from edge_vlm.gguf.constants import DYNAMIC_LOW_TOKENS, DYNAMIC_PROJECTORS, TILING_PROJECTORS
from edge_vlm.gguf.reader import GGUFInfo, read_gguf
from edge_vlm.gguf.validate import (
    mmproj_output_width,
    text_embedding_width,
    validate_mmproj,
    validate_text_model,
)
from edge_vlm.resolve import ModelRef, resolve_model
from edge_vlm.template import ChatTemplate

if TYPE_CHECKING:
    from edge_vlm.store.store import Store

#: Longest side handed to the encoder when the mmproj gives no better figure.
FALLBACK_MAX_SIDE = 2048


@dataclass(frozen=True)
class ModelInfo:
    """What edge-vlm knows about a loaded pair (from the GGUF metadata)."""

    name: str
    model_path: Path
    mmproj_path: Path
    architecture: str
    n_embd: int
    n_ctx_train: int
    projector_type: str
    image_size: int
    preproc_image_size: int
    has_chat_template: bool
    patch_size: int = 0
    scale_factor: int = 1
    gpu: bool = False

    @property
    def tiling(self) -> bool:
        """Whether the projector cuts large images into tiles."""
        return self.projector_type in TILING_PROJECTORS

    @property
    def dynamic(self) -> bool:
        """Whether the projector sizes images by a token budget (Qwen-VL, Pixtral)."""
        return self.projector_type in DYNAMIC_PROJECTORS

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens one encoder tile yields (0 for a dynamic-resolution projector)."""
        if not self.image_size or not self.patch_size or self.dynamic:
            return 0
        return (self.image_size // self.patch_size) ** 2 // max(1, self.scale_factor) ** 2

    def image_token_budget(
        self, detail: str, max_image_tokens: int | None, max_tiles: int | None
    ) -> int:
        """The mtmd image-token budget for a detail level (0: the model's full tiling).

        ``low`` is one tile's worth (libmtmd then makes one slice plus the overview, the same
        picture when the image is one tile in size: see :meth:`one_tile_side`);
        ``high`` is the full tiling; ``auto`` takes the settings' budget, else full detail
        when a GPU does the encoding and one tile's worth on a CPU, where every tile of a
        SigLIP-sized encoder costs about two seconds.

        A dynamic-resolution projector (Qwen-VL, Pixtral) takes the budget as its
        ``image_max_tokens``: ``low`` is :data:`DYNAMIC_LOW_TOKENS`, ``high`` its own
        maximum, ``auto`` the settings' ``max_image_tokens``, else as for tiles (full on a
        GPU, low on a CPU). ``max_tiles`` does not apply to it.
        """
        if self.dynamic:
            if detail == "high":
                return 0
            if detail == "low":
                return DYNAMIC_LOW_TOKENS
            if max_image_tokens:
                return max_image_tokens
            return 0 if self.gpu else DYNAMIC_LOW_TOKENS
        if not self.tiling or not self.tokens_per_tile or detail == "high":
            return 0
        per_tile = self.tokens_per_tile
        if detail == "low":
            return per_tile
        budgets = [b for b in (max_image_tokens, (max_tiles or 0) * per_tile) if b]
        if budgets:
            return max(per_tile, min(budgets))
        return 0 if self.gpu else per_tile

    def one_tile_side(self, budget: int) -> int:
        """The side to resize images to at an image-token ``budget`` so that they are
        encoded once, or 0.

        At a one-tile budget, libmtmd's idefics3 preprocessing makes an overview and one
        slice, each the image resized to the tile size; for an image already of that size
        both are plain copies, so the second encoder pass repeats the first and the engine
        skips it (half the vision time at ``detail="low"``).
        """
        if self.projector_type == "idefics3" and budget and budget == self.tokens_per_tile:
            return self.image_size
        return 0

    def max_image_side(self, detail: str) -> int:
        """The longest side worth decoding an image to for a detail level."""
        if self.tiling:
            if detail == "low":
                return self.image_size or FALLBACK_MAX_SIDE
            return self.preproc_image_size or FALLBACK_MAX_SIDE
        if self.image_size and self.projector_type in {"mlp", "mlp_norm", "ldp", "ldpv2"}:
            return self.image_size
        return FALLBACK_MAX_SIDE


def _meta_int(info: GGUFInfo, key: str, default: int = 0) -> int:
    value = info.metadata.get(key, default)
    return int(value) if isinstance(value, (int, float)) else default


def _meta_str(info: GGUFInfo, key: str, default: str = "") -> str:
    value = info.metadata.get(key, default)
    return value if isinstance(value, str) else default


def inspect_pair(ref: ModelRef) -> ModelInfo:
    """Validate both files and their pairing, without llama.cpp.

    Raises:
        ModelLoadError: a file is not a valid GGUF of the expected kind.
        ModelMismatchError: the mmproj's output width differs from the model's width.
    """
    model = read_gguf(ref.model)
    validate_text_model(model, ref.model)
    proj = read_gguf(ref.mmproj)
    validate_mmproj(proj, ref.mmproj)
    width_model = text_embedding_width(model)
    width_proj = mmproj_output_width(proj)
    if width_model and width_proj and width_model != width_proj:
        raise ModelMismatchError(
            f"mmproj '{ref.mmproj}' projects to {width_proj} dims but model '{ref.model}' "
            f"expects {width_model}: they are from different models; use the mmproj "
            "published with this model"
        )
    arch = _meta_str(model, "general.architecture")
    return ModelInfo(
        name=ref.name,
        model_path=ref.model,
        mmproj_path=ref.mmproj,
        architecture=arch,
        n_embd=width_model or 0,
        n_ctx_train=_meta_int(model, f"{arch}.context_length"),
        projector_type=_meta_str(proj, "clip.projector_type")
        or _meta_str(proj, "clip.vision.projector_type"),
        image_size=_meta_int(proj, "clip.vision.image_size"),
        preproc_image_size=_meta_int(proj, "clip.vision.preproc_image_size"),
        has_chat_template="tokenizer.chat_template" in model.metadata,
        patch_size=_meta_int(proj, "clip.vision.patch_size"),
        scale_factor=_meta_int(proj, "clip.vision.projector.scale_factor", 1) or 1,
    )


def file_fingerprint(path: Path, sha256: str = "") -> str:
    """The identity of a large file, for keys of caches and results.

    Args:
        path: The file.
        sha256: Its sha256 when known (a store model's, from the manifest). A store blob
            is known by its name too. Then that is the identity: the content's, the same
            wherever the file is. Else a cheap one: path, size, mtime and hashes of the
            file's head and tail.
    """
    from edge_vlm.store.store import blob_digest

    sha256 = sha256 or blob_digest(path)
    if sha256:
        return sha256[:32]
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 1 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:32]


def default_threads() -> int:
    """The number of physical cores (llama.cpp is memory-bound past that)."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:  # psutil missing or unable to tell
        physical = None
    return max(1, physical or os.cpu_count() or 1)


@dataclass
class LoadedModel:
    """A model pair loaded into llama.cpp, with its engine and template."""

    ref: ModelRef
    info: ModelInfo
    engine: Engine
    template: ChatTemplate

    def close(self) -> None:
        """Free everything llama.cpp holds for this model."""
        self.engine.backend.close()
        self.engine.cache.clear()
        self.engine.kv_states.clear()


def _disk_cache(settings: Settings) -> DiskEmbeddingCache | None:
    c = settings.cache
    if not c.disk_cache_mb:
        return None
    folder = Path(c.disk_cache_dir).expanduser() if c.disk_cache_dir else cache_dir() / "embeddings"
    return DiskEmbeddingCache(folder, c.disk_cache_mb * 1024 * 1024)


def load_model(name: str | Path | None, mmproj: str | Path | None,
               settings: Settings, store: Store | None = None) -> LoadedModel:
    """Resolve, validate and load a model pair.

    Args:
        name: ``default``, a store name or a GGUF path.
        mmproj: The vision projector of a model given as a path.
        settings: The settings (read here, not again below).
        store: The model store (default: opened from ``settings``).

    Raises:
        ModelNotFoundError, ModelLoadError, ModelMismatchError: with what to do.
    """
    from edge_vlm.backend import Backend, BackendConfig, supports_gpu_offload
    from edge_vlm.preflight import check_before_load, open_store

    store = store if store is not None else open_store(settings)
    ref = resolve_model(name, mmproj, store=store)
    rt = settings.runtime
    gpu = rt.gpu == "on" or (rt.gpu == "auto" and supports_gpu_offload())
    info = dataclasses.replace(inspect_pair(ref), gpu=gpu)
    check_before_load(ref, settings, store)
    images = settings.images
    # The vision context made at load serves the default detail; others are made on use.
    default_budget = info.image_token_budget(images.detail, images.max_image_tokens,
                                             images.max_tiles)
    backend = Backend(BackendConfig(
        model_path=ref.model,
        mmproj_path=ref.mmproj,
        n_ctx=rt.n_ctx,
        n_batch=rt.n_batch,
        threads=rt.threads or default_threads(),
        n_gpu_layers=(rt.n_gpu_layers if rt.n_gpu_layers >= 0 else 999) if gpu else 0,
        mmproj_use_gpu=gpu and rt.mmproj_on_gpu,
        flash_attn=rt.flash_attn,
        verbose=rt.verbose,
        swa_full=rt.swa_full,
        image_max_tokens=default_budget,
        one_tile_side=info.image_size if info.projector_type == "idefics3" else 0,
    ))
    try:
        template = ChatTemplate(
            backend.chat_template(),
            bos_token=backend.token_text(backend.bos),
            eos_token=backend.token_text(backend.eos),
        )
        if template.is_fallback:
            warnings.warn(
                f"model '{ref.model}' has no chat template; using edge-vlm's generic one "
                "(<|role|>...<|end|>): answers may be poor",
                stacklevel=2,
            )
        engine = Engine(
            backend,
            mmproj_fingerprint=file_fingerprint(ref.mmproj, ref.mmproj_sha256),
            embedding_cache_bytes=settings.cache.embedding_cache_mb * 1024 * 1024,
            prefix_reuse=settings.cache.prefix_reuse,
            disk_cache=_disk_cache(settings),
            # An explicit runtime.threads is kept as is; the default follows the load.
            threads=None if rt.threads else ThreadAdvisor(backend.threads, machine_load()),
            kv_state_bytes=settings.cache.kv_ram_mb * 1024 * 1024,
        )
    except BaseException:
        backend.close()
        raise
    return LoadedModel(ref, info, engine, template)

"""The oracle for the family conformance tests: libmtmd's own helper, from a fresh context.

``mtmd_helper_eval_chunks`` is llama.cpp's reference way to evaluate a tokenized
multimodal prompt (M-RoPE positions, non-causal image attention, batching); this module
drives it through llama-cpp-python's ctypes bindings, independently of edge-vlm's engine,
and decodes greedily. Tests may import llama_cpp; the runtime does so only in edge_vlm/backend/
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np
import numpy.typing as npt

from edge_vlm.chunks import RGBImage

FLASH = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO  # as edge-vlm's default runtime.flash_attn


@dataclass
class OracleResult:
    """What the oracle computed for one prompt."""

    prompt_logits: npt.NDArray[np.float32]
    tokens: list[int]
    text: str
    n_tokens: int
    n_pos: int
    recheck_logits: npt.NDArray[np.float32] | None = None
    """With ``recheck``: the prompt's last token evaluated again after the generated tokens
    were cut out of the KV cache (what a follow-up turn does)."""


def _check(ok: object, what: str) -> None:
    if not ok:
        raise RuntimeError(f"oracle: {what} failed")


def oracle_run(model: Path, mmproj: Path, prompt: str, images: Sequence[RGBImage], *,
               n_predict: int, n_ctx: int, n_batch: int = 512, threads: int = 2,
               image_max_tokens: int = 0, image_min_tokens: int = 0,
               recheck: bool = False) -> OracleResult:
    """Tokenize ``prompt`` with libmtmd, evaluate it with ``mtmd_helper_eval_chunks`` in a
    fresh context, then decode ``n_predict`` tokens greedily (stopping at end of generation).

    ``prompt`` is exactly the text edge-vlm tokenizes (template rendered, leading BOS text
    already dropped where the tokenizer adds one); BOS is added as libmtmd does.
    """
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    lmodel = llama_cpp.llama_model_load_from_file(str(model).encode(), mp)
    _check(lmodel, "loading the model")
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = FLASH
    ctx = llama_cpp.llama_init_from_model(lmodel, cp)
    _check(ctx, "creating a context")
    mparams = mtmd.mtmd_context_params_default()
    mparams.use_gpu = False
    mparams.n_threads = threads
    mparams.warmup = False
    mparams.print_timings = False
    mparams.flash_attn_type = FLASH
    if image_max_tokens:
        mparams.image_max_tokens = image_max_tokens
    if image_min_tokens:
        mparams.image_min_tokens = image_min_tokens
    mctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), lmodel, mparams)
    _check(mctx, "loading the mmproj")
    vocab = llama_cpp.llama_model_get_vocab(lmodel)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    bitmaps = []
    chunks = mtmd.mtmd_input_chunks_init()
    batch = llama_cpp.llama_batch_init(1, 0, 1)
    try:
        for img in images:
            buf = (ctypes.c_uint8 * len(img.data)).from_buffer_copy(img.data)
            bmp = mtmd.mtmd_bitmap_init(img.width, img.height, buf)
            mtmd.mtmd_bitmap_set_id(bmp, img.identity.encode())
            bitmaps.append(bmp)
        raw = prompt.encode()
        inp = mtmd.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), True, True
        arr = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        rc = mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
        _check(rc == 0, f"mtmd_tokenize (error {rc})")
        n_tokens = int(mtmd.mtmd_helper_get_n_tokens(chunks))
        n_pos = int(mtmd.mtmd_helper_get_n_pos(chunks))
        new_n_past = llama_cpp.llama_pos(0)
        rc = mtmd.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, n_batch, True,
                                          ctypes.byref(new_n_past))
        _check(rc == 0, f"mtmd_helper_eval_chunks (error {rc})")
        n_past = int(new_n_past.value)

        def logits() -> npt.NDArray[np.float32]:
            llama_cpp.llama_synchronize(ctx)
            ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

        first = logits()
        out: list[int] = []
        text = b""
        cur = first
        for _ in range(n_predict):
            tok = int(np.argmax(cur))
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            piece = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(vocab, tok, piece, 64, 0, False)
            text += piece.raw[:n]
            batch.n_tokens = 1
            batch.token[0], batch.pos[0], batch.n_seq_id[0] = tok, n_past, 1
            batch.seq_id[0][0], batch.logits[0] = 0, True
            _check(llama_cpp.llama_decode(ctx, batch) == 0, "decoding a token")
            n_past += 1
            cur = logits()
        again = None
        if recheck:
            last = mtmd.mtmd_input_chunks_get(chunks, mtmd.mtmd_input_chunks_size(chunks) - 1)
            n = ctypes.c_size_t()
            toks = mtmd.mtmd_input_chunk_get_tokens_text(last, ctypes.byref(n))
            mem = llama_cpp.llama_get_memory(ctx)
            _check(llama_cpp.llama_memory_seq_rm(mem, 0, n_pos - 1, -1), "cutting the cache")
            batch.n_tokens = 1
            batch.token[0], batch.pos[0], batch.n_seq_id[0] = toks[n.value - 1], n_pos - 1, 1
            batch.seq_id[0][0], batch.logits[0] = 0, True
            _check(llama_cpp.llama_decode(ctx, batch) == 0, "decoding the last prompt token")
            again = logits()
        return OracleResult(first, out, text.decode(errors="replace").lstrip(" "),
                            n_tokens, n_pos, again)
    finally:
        llama_cpp.llama_batch_free(batch)
        mtmd.mtmd_input_chunks_free(chunks)
        for bmp in bitmaps:
            mtmd.mtmd_bitmap_free(bmp)
        mtmd.mtmd_free(mctx)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(lmodel)

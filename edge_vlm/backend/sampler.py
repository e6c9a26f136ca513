"""Sampling: llama.cpp's sampler chain with logit bias, penalties and a JSON-schema grammar,
and the checks of those request fields made before any model work."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from edge_vlm.backend._lib import init_once, llama_cpp
from edge_vlm.chunks import SamplerParams
from edge_vlm.errors import GenerationError, RequestError


class SamplingModel(Protocol):
    """What a :class:`Sampler` reads of a :class:`~edge_vlm.backend.model.Backend`."""

    n_vocab: int
    _vocab: Any  # const llama_vocab *
    _ctx: Any  # llama_context *


#: numpy's view of ``llama_token_data`` (id, logit, p).
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class Sampler:
    """llama.cpp's sampler chain: logit bias, penalties, grammar, then greedy or
    top-k/p/min-p + temperature + a seeded draw.

    Raises:
        RequestError: a logit-bias token id outside the vocabulary, or a grammar llama.cpp
            refuses.
    """

    #: Tokens the repetition penalties look back over (llama.cpp's common default).
    PENALTY_LAST_N = 64

    def __init__(self, backend: SamplingModel, p: SamplerParams) -> None:
        self._backend = backend
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._chain = chain
        add = llama_cpp.llama_sampler_chain_add
        n_vocab = backend.n_vocab
        if p.logit_bias:
            check_logit_bias(p.logit_bias, n_vocab)
            arr = (llama_cpp.llama_logit_bias * len(p.logit_bias))()
            for i, (token, bias) in enumerate(p.logit_bias):
                arr[i] = llama_cpp.llama_logit_bias(token, bias)
            add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), arr))
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            add(chain, llama_cpp.llama_sampler_init_penalties(
                n_vocab, self.PENALTY_LAST_N, p.repeat_penalty, p.frequency_penalty,
                p.presence_penalty))
        self._grammar: Any = None
        if p.grammar is not None:
            # Kept out of the chain: a grammar that allows no token would make the chain
            # pick a forbidden one, and llama.cpp aborts the process on accepting it.
            g = llama_cpp.llama_sampler_init_grammar(backend._vocab, p.grammar.encode(), b"root")
            if not g:
                self.close()
                raise RequestError(
                    "response_format: llama.cpp refused the grammar made from the JSON schema "
                    "(too many repetitions or rules); simplify the schema",
                    param="response_format")
            self._grammar = g
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._cand = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        if p.temperature <= 0.0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(p.top_k))
            add(chain, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(p.temperature))
            seed = llama_cpp.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
            add(chain, llama_cpp.llama_sampler_init_dist(seed))

    def sample(self) -> int:
        """Sample the next token from the last logits (and accept it into the chain).

        Raises:
            RequestError: the response_format grammar allows no token at this point.
        """
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self._chain, self._backend._ctx, -1))
        backend = self._backend
        cand = self._cand
        ptr = llama_cpp.llama_get_logits_ith(backend._ctx, -1)
        cand["id"] = self._ids  # the chain sorts the array in place: lay it out anew
        cand["logit"] = np.ctypeslib.as_array(ptr, shape=(backend.n_vocab,))
        cand["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(
            data=cand.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(cand),
            selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        if not np.isfinite(cand["logit"][:arr.size]).any():
            raise RequestError(
                "response_format: the JSON schema allows no text this model can write at this "
                "point of the answer (an empty character range or an impossible pattern?)",
                param="response_format")
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise GenerationError("llama.cpp's sampler chain selected no token")
        token = int(cand["id"][arr.selected])
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if getattr(self, "_grammar", None) is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


def check_logit_bias(bias: Sequence[tuple[int, float]], n_vocab: int) -> None:
    """Raise RequestError for a ``logit_bias`` token id the vocabulary does not have."""
    for token, _ in bias:
        if not 0 <= token < n_vocab:
            raise RequestError(
                f"logit_bias.{token}: no such token; this model's token ids run from 0 to "
                f"{n_vocab - 1}", param=f"logit_bias.{token}")


def json_schema_grammar(schema: dict[str, Any],
                        field: str = "response_format.json_schema.schema") -> str:
    """A GBNF grammar for a JSON schema (llama-cpp-python's converter), checked so that
    llama.cpp can take it without crashing (see :mod:`edge_vlm.grammar`).

    Args:
        schema: The JSON schema.
        field: Where it is in the request (named in errors).

    Raises:
        RequestError: the schema is unsupported or beyond the bounds, naming its part;
            :class:`~edge_vlm.errors.RequestTooLargeError` for size limits.
    """
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from edge_vlm.grammar import check_grammar, check_schema

    check_schema(schema, field)
    try:
        grammar = str(json_schema_to_gbnf(json.dumps(schema)))
    except RecursionError:
        raise RequestError(f"{field}: the schema refers to itself too deeply", param=field) \
            from None
    except Exception as err:  # the converter raises ValueError, AssertionError, KeyError...
        raise RequestError(f"{field}: the runtime cannot turn this JSON schema into a "
                           f"grammar: {err}", param=field) from None
    check_grammar(grammar, field)
    init_once()
    # Parse it once here, before any model work (no vocabulary is needed to parse).
    sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode(), b"root")
    if not sampler:
        raise RequestError(
            f"{field}: llama.cpp refused the grammar made from this schema (too many "
            "repetitions or rules, or a rule that refers to itself first); simplify it",
            param=field)
    llama_cpp.llama_sampler_free(sampler)
    return grammar

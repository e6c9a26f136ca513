"""Every sampling field through llama.cpp's real sampler chain (the tiny model), at ordinary
and edge values, so that a change in the bindings' signatures fails here and not for a user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_vlm.errors import RequestError
from edge_vlm.schema import (
    LOGIT_BIAS_LIMIT,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_REPEAT_PENALTY,
    MAX_TOP_K,
    PENALTY_LIMIT,
)

ASK = [{"role": "user", "content": "red square circle"}]

# Each field with ordinary and edge values (0, negative where allowed, the documented maxima).
CASES: list[tuple[str, Any]] = [
    *[("temperature", v) for v in (0.0, 0.7, 2.0)],
    *[("top_p", v) for v in (0.0, 0.5, 1.0)],
    *[("top_k", v) for v in (0, 1, 40, MAX_TOP_K)],
    *[("min_p", v) for v in (0.0, 0.05, 1.0)],
    *[("seed", v) for v in (0, 42, -1, 2**63, -(2**70))],
    *[("repeat_penalty", v) for v in (1e-3, 1.0, 1.1, MAX_REPEAT_PENALTY)],
    *[("frequency_penalty", v) for v in (-PENALTY_LIMIT, 0.0, 0.5, PENALTY_LIMIT)],
    *[("presence_penalty", v) for v in (-PENALTY_LIMIT, 0.0, 0.3, PENALTY_LIMIT)],
    *[("logit_bias", v) for v in ({}, {"5": LOGIT_BIAS_LIMIT}, {"5": -LOGIT_BIAS_LIMIT})],
    ("max_tokens", 1),
    ("stop", ["square"]),
]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize(("field", "value"), CASES, ids=[f"{f}={v!r}"[:40] for f, v in CASES])
def test_every_sampling_field_runs_through_the_real_chain(tiny_vlm, field, value, sampled):
    extra = {"temperature": 0.8, "seed": 7} if sampled and field != "temperature" else {}
    reply = tiny_vlm.chat(ASK, **{"max_tokens": 6, **extra, field: value})
    choice = reply.choices[0]
    assert choice.finish_reason in {"stop", "length"}
    assert reply.usage.completion_tokens >= 1 or choice.finish_reason == "stop"


def test_all_penalties_together_in_the_sampled_chain(tiny_vlm):
    reply = tiny_vlm.chat(ASK, max_tokens=12, temperature=1.0, seed=3, top_k=20, top_p=0.9,
                          min_p=0.01, repeat_penalty=1.3, frequency_penalty=0.5,
                          presence_penalty=0.3, logit_bias={"7": -5.0})
    assert reply.usage.completion_tokens >= 1


def _tokens(vlm, reply) -> list[int]:  # type: ignore[no-untyped-def]
    text = reply.choices[0].message.content
    return vlm.engine.backend.tokenize_text(text, add_special=False, parse_special=False)


def test_repeat_penalty_changes_a_repetitive_greedy_answer(tiny_vlm):
    plain = tiny_vlm.chat(ASK, max_tokens=24, temperature=0)
    penalised = tiny_vlm.chat(ASK, max_tokens=24, temperature=0, repeat_penalty=MAX_REPEAT_PENALTY,
                              frequency_penalty=PENALTY_LIMIT, presence_penalty=PENALTY_LIMIT)
    a, b = plain.choices[0].message.content, penalised.choices[0].message.content
    assert a != b
    # The penalised answer repeats fewer of its words.
    def repeats(s: str) -> int:
        words = s.split()
        return len(words) - len(set(words))
    assert repeats(b) <= repeats(a)


def test_logit_bias_forces_and_bans_a_token(tiny_vlm):
    backend = tiny_vlm.engine.backend
    target = backend.tokenize_text("circle", add_special=False, parse_special=False)[-1]
    forced = tiny_vlm.chat(ASK, max_tokens=4, temperature=0,
                           logit_bias={str(target): LOGIT_BIAS_LIMIT})
    assert set(_tokens(tiny_vlm, forced)) == {target}
    plain = tiny_vlm.chat(ASK, max_tokens=8, temperature=0)
    first = _tokens(tiny_vlm, plain)[0]
    banned = tiny_vlm.chat(ASK, max_tokens=8, temperature=0,
                           logit_bias={str(first): -LOGIT_BIAS_LIMIT})
    assert first not in _tokens(tiny_vlm, banned)


def test_a_seed_reproduces_a_sampled_answer(tiny_vlm):
    a = tiny_vlm.chat(ASK, max_tokens=12, temperature=1.5, seed=1234, top_k=0, top_p=1.0)
    b = tiny_vlm.chat(ASK, max_tokens=12, temperature=1.5, seed=1234, top_k=0, top_p=1.0)
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("frequency_penalty", 2.5, "between -2 and 2"),
    ("presence_penalty", -3, "between -2 and 2"),
    ("repeat_penalty", 0, "above 0"),
    ("repeat_penalty", -1.0, "above 0"),
    ("repeat_penalty", 11, "at most 10"),
    ("top_k", -1, "between 0"),
    ("top_k", 2**40, "between 0"),
    ("temperature", float("nan"), "finite"),
    ("logit_bias", {"abc": 1}, "token ids"),
    ("logit_bias", {"5": 101}, "between -100 and 100"),
    ("logit_bias", {"5": float("inf")}, "between -100 and 100"),
    ("logit_bias", {str(i): 1 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}, "at most"),
    ("logit_bias", {"999999": 1}, "no such token"),
    ("stop", ["x"] * 17, "at most 16"),
    ("stop", ["x" * 1001], "longer than"),
])
def test_out_of_range_sampling_values_are_request_errors_naming_the_field(
        tiny_vlm, field, value, needle):
    with pytest.raises(RequestError, match=needle) as info:
        tiny_vlm.chat(ASK, max_tokens=2, **{field: value})
    assert field in str(info.value)
    assert info.value.http_status == 400
    # The model still answers afterwards.
    assert tiny_vlm.chat(ASK, max_tokens=2).usage.completion_tokens >= 1


def test_repeat_penalty_from_the_environment_through_the_cli(tiny_paths, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_VLM_")}
    env.update(EDGE_VLM_SAMPLING__REPEAT_PENALTY="1.1", EDGE_VLM_HOME=str(tmp_path / "home"),
               EDGE_VLM_CONFIG=str(tmp_path / "none.toml"), EDGE_VLM_STORE__CHECK_LOAD="false",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-m", "edge_vlm.cli", "run", "--model", str(tiny_paths.model),
         "--mmproj", str(tiny_paths.mmproj), "--max-tokens", "4", "red square"],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "TypeError" not in proc.stderr
    assert proc.stdout.strip()

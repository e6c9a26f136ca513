"""Property-based: any request, however hostile, gets an answer or a RequestError (4xx)
whose message names the problem, never another exception and never a crash; and the next
ordinary request answers exactly as before. Through the Python API on the tiny model.

A longer run: ``EDGE_VLM_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_api.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_vlm.errors import RequestError
from edge_vlm.schema import ChatCompletion, ChatCompletionChunk
from tests.fuzz_support import fuzz_settings, requests

ORDINARY = [{"role": "user", "content": "red square circle"}]


@pytest.fixture(scope="module")
def baseline(tiny_vlm: Any) -> str:
    return str(tiny_vlm.chat(ORDINARY, max_tokens=6, temperature=0).choices[0].message.content)


def _answer(vlm: Any, request: Any) -> Any:
    reply = vlm.chat(request)
    if isinstance(reply, ChatCompletion):
        return reply
    chunks = list(reply)
    assert chunks and all(isinstance(c, ChatCompletionChunk) for c in chunks)
    return chunks


def _bounded(request: Any) -> Any:
    """Keep generations short: a request that names no token limit gets 4."""
    if isinstance(request, dict) and "max_tokens" not in request \
            and "max_completion_tokens" not in request:
        request = {**request, "max_tokens": 4}
    return request


def check_one(vlm: Any, request: Any, baseline: str) -> None:
    sent = copy.deepcopy(request)
    try:
        _answer(vlm, _bounded(request))
    except RequestError as err:
        assert 400 <= err.http_status < 500
        assert err.message.strip(), sent
    # Any other exception fails the test: it would be a 500 at the server.
    again = vlm.chat(ORDINARY, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == baseline, sent


@fuzz_settings(150)
@given(data=st.data())
def test_hostile_requests_through_the_python_api(tiny_vlm, images, baseline, data):
    request = data.draw(requests([str(images["red"])]))
    check_one(tiny_vlm, request, baseline)


@fuzz_settings(40)
@given(request=requests([]).map(lambda r: {**r, "response_format": {
    "type": "json", "value": {"type": "object", "properties": {"x": {"type": "string"}}}}}))
def test_valid_schema_with_hostile_rest(tiny_vlm, baseline, request):
    check_one(tiny_vlm, request, baseline)

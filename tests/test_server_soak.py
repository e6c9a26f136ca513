"""The soak test's CI slice: 100 mixed requests from 16 clients against a real server
process (``benchmarks/server_soak.py``; the full run is 1,000 requests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "server_soak.py"


def load_soak() -> Any:
    spec = importlib.util.spec_from_file_location("server_soak", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_hundred_mixed_requests_no_5xx_no_growth() -> None:
    report = load_soak().soak(requests=100, clients=16)
    assert report["requests"] == 100 and report["hung_clients"] == 0
    assert report["server_errors"] == {}, report["by_kind_and_status"]
    assert set(report["statuses"]) <= {0, 200, 400, 401, 404, 503}, report["statuses"]
    assert report["statuses"].get(200, 0) > 20  # valid requests were answered
    assert report["after"]["threads"] <= report["before"]["threads"], report
    assert report["after"]["fds"] <= report["before"]["fds"], report
    assert report["after"]["rss_mb"] <= report["before"]["rss_mb"] * 1.10, report
    assert report["final_status"] == 200

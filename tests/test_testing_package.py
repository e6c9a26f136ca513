"""edge_vlm.testing as an embedder uses it: names, errors, reproducibility, no runtime cost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_vlm.testing import family_names, tiny_pair


def test_unknown_family_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match=r"known: generic, llava, smolvlm, qwen2\.5-vl"):
        tiny_pair("qwen9", tmp_path)


def test_without_gguf_the_error_names_the_extra(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'edge-vlm\[testing\]'"):
        tiny_pair("gemma-3", tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    pa, pb, pc = tiny_pair("qwen2.5-vl", a), tiny_pair("qwen2.5-vl", b), tiny_pair(
        "qwen2.5-vl", c, seed=1)
    assert pa[0].read_bytes() == pb[0].read_bytes() and pa[1].read_bytes() == pb[1].read_bytes()
    assert pa[0].read_bytes() != pc[0].read_bytes()


def test_missing_output_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tiny_pair("llava", tmp_path / "nope")


def test_the_runtime_does_not_import_gguf() -> None:
    code = ("import sys, edge_vlm, edge_vlm.loader, edge_vlm.gguf.validate, edge_vlm.engine; "
            "print('gguf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_every_family_is_listed() -> None:
    assert family_names() == ["generic", "llava", "smolvlm", "qwen2.5-vl", "qwen3-vl",
                              "gemma-3", "internvl", "lfm2-vl", "moondream", "pixtral"]

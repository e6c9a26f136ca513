"""The memory estimate (``models show``, the pre-load check) against what llama.cpp itself
allocates: the KV cache of sliding-window models (Gemma 3) and the weights the CPU backend
repacks (Q4_0 / Q4_K on x86 with AVX2). Both were missing and put the estimate 15-20%
under the measured peak of Gemma 3 4B; ``runtime.swa_full`` must reach llama.cpp.

The figures compared are llama.cpp's own log lines (``llama_kv_cache: size = ... MiB`` and
``CPU_REPACK model buffer size = ... MiB``), read from a real load of a tiny pair.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import pytest

import edge_vlm
from edge_vlm.backend import quantize_model, system_info
from edge_vlm.config import load_settings
from edge_vlm.gguf.reader import read_gguf
from edge_vlm.preflight.memory import estimate_files
from edge_vlm.store.manifest import facts_from
from edge_vlm.testing import tiny_pair

MiB = 1024 * 1024
N_CTX = 4096
_KV = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers")
_REPACK = re.compile(r"CPU_REPACK model buffer size =\s*([\d.]+) MiB")


def _settings(folder: Path, **values: object) -> object:
    return load_settings({"runtime.n_ctx": N_CTX, "runtime.threads": 1,
                          "runtime.verbose": True, "store.check_load": False,
                          **values}, config_file=folder / "no-config.toml")


def _load_log(model: Path, mmproj: Path, capfd: pytest.CaptureFixture[str],
              **values: object) -> str:
    """llama.cpp's log of loading the pair with these settings."""
    capfd.readouterr()
    vlm = edge_vlm.load(model, mmproj, settings=_settings(model.parent, **values))
    vlm.close()
    return capfd.readouterr().err


def _kv_mib(log: str) -> float:
    sizes = [float(m.group(1)) for m in _KV.finditer(log)]
    assert sizes, "llama.cpp printed no KV cache size"
    return sum(sizes)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_pair("gemma-3", tmp_path_factory.mktemp("gemma"))


def test_gemma_facts_name_its_sliding_window_layers(gemma: tuple[Path, Path]) -> None:
    facts = facts_from(read_gguf(gemma[0]), read_gguf(gemma[1]))
    assert facts.sliding_window == 512
    # Gemma 3's pattern (every 6th layer attends to everything): both tiny layers use it.
    assert facts.swa_layers == facts.n_layer == 2


@pytest.mark.parametrize("swa_full", [False, True])
def test_kv_estimate_equals_what_llama_cpp_allocates(gemma: tuple[Path, Path], swa_full: bool,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    log = _load_log(*gemma, capfd, **{"runtime.swa_full": swa_full})
    est = estimate_files(*gemma, _settings(gemma[0].parent, **{"runtime.swa_full": swa_full}))
    assert est.kv_cache / MiB == pytest.approx(_kv_mib(log), abs=0.01)


def test_sliding_window_cache_is_smaller_unless_asked(gemma: tuple[Path, Path],
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    window = _kv_mib(_load_log(*gemma, capfd))
    full = _kv_mib(_load_log(*gemma, capfd, **{"runtime.swa_full": True}))
    # 512-token window + a 512-token batch = 1024 cells instead of 4096
    assert window == pytest.approx(full / 4, abs=0.01)


def test_a_model_without_a_window_is_unchanged(tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    pair = tiny_pair("llava", tmp_path)
    facts = facts_from(read_gguf(pair[0]), read_gguf(pair[1]))
    assert facts.sliding_window == facts.swa_layers == 0
    log = _load_log(*pair, capfd)
    est = estimate_files(*pair, _settings(tmp_path))
    assert est.kv_cache / MiB == pytest.approx(_kv_mib(log), abs=0.01)


@pytest.mark.skipif(platform.machine() not in {"x86_64", "AMD64"},
                    reason="the repacked types are checked for x86 here")
def test_repacked_weights_are_counted(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    if "AVX2 = 1" not in system_info()["system_info"]:
        pytest.skip("this CPU has no AVX2: llama.cpp repacks nothing")
    model, mmproj = tiny_pair("llava", tmp_path)
    q4 = tmp_path / "model-q4_0.gguf"
    quantize_model(model, q4, "Q4_0")
    log = _load_log(q4, mmproj, capfd)
    repack = [float(m.group(1)) for m in _REPACK.finditer(log)]
    assert repack and repack[0] > 0, "llama.cpp repacked nothing: the test model is too small"
    est = estimate_files(q4, mmproj, _settings(tmp_path))
    assert est.repacked / MiB == pytest.approx(repack[0], abs=0.01)
    labels = [label for label, _ in est.breakdown()]
    assert "weights repacked for the CPU" in labels
    # with GPU offload the weights live in VRAM: nothing is repacked in RAM
    gpu = estimate_files(q4, mmproj, _settings(tmp_path, **{"runtime.gpu": "on"}))
    assert gpu.repacked == 0


FAMILIES = ["llava", "smolvlm", "qwen2.5-vl", "qwen3-vl", "gemma-3", "internvl", "lfm2-vl",
            "moondream", "pixtral"]


@pytest.mark.skipif(platform.system() != "Linux", reason="peak RSS read from /proc")
@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_is_within_15_percent_of_a_chat_per_family(family: str, home: Path,
                                                            tmp_path: Path) -> None:
    """``models show``'s estimate against the peak RSS of a fresh process that loads the
    family's pair and answers about a 512x512 image (the tiny pairs are mostly process
    overhead and compute buffers; the full-size figures are in the README)."""
    from edge_vlm.preflight.memcheck import measure

    model, mmproj = tiny_pair(family, tmp_path)
    result = measure(model, mmproj, n_ctx=N_CTX, image_side=512)
    assert abs(result["error_pct"]) <= 15, result

"""The exporter: a model written with the ``gguf`` library loads in llama.cpp (through
edge-vlm) and computes what PyTorch computes: same prompt tokens, same image embeddings,
same next-token logits (F32 files, so only float rounding differs).

Needs PyTorch (the ``train`` extra); skipped without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from shapes_vlm import parity, vocab  # noqa: E402
from shapes_vlm.export import export, write_mmproj  # noqa: E402
from shapes_vlm.model import Config, ShapesVLM, init_weights  # noqa: E402


@pytest.fixture(autouse=True)
def own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user settings; the child-process load check records into a private store."""
    for key in [k for k in os.environ if k.startswith("EDGE_VLM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("EDGE_VLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGE_VLM_CONFIG", str(tmp_path / "no-config.toml"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ShapesVLM]:
    torch.manual_seed(3)
    model = ShapesVLM(Config(n_vocab=len(vocab.shapes_vocab()), n_layer=2, v_layer=2))
    init_weights(model)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    torch.save({"config": model.c.to_dict(), "model": model.state_dict()}, path)
    return path, model.eval()


def test_exported_f32_files_match_pytorch_in_llama_cpp(checkpoint, tmp_path):
    ckpt, model = checkpoint
    files = export(model, tmp_path / "out", f32=True, quants=())
    assert sorted(p.name for p in (tmp_path / "out").glob("*.gguf")) == ["mmproj-f32.gguf",
                                                               "model-f32.gguf"]
    result = parity.run(ckpt, files["model"], files["mmproj"], n=2, seed=5)
    assert result["token_sequences_equal"] == 1.0
    assert result["embedding_max_abs_diff"] < 1e-3
    assert result["logits_max_abs_diff"] < 1e-2 * max(1.0, result["logits_max_abs"])


def test_f16_export_and_q8_0_quantization_load(checkpoint, tmp_path):
    import edge_vlm

    _, model = checkpoint
    files = export(model, tmp_path / "out", quants=("Q8_0",))
    assert {"model", "mmproj", "Q8_0"} <= set(files)
    assert files["Q8_0"].stat().st_size < files["model"].stat().st_size
    with edge_vlm.load(files["Q8_0"], files["mmproj"], threads=1, gpu="off") as vlm:
        reply = vlm.chat([{"role": "user", "content": "What is this?"}], max_tokens=3)
        assert reply.usage.completion_tokens >= 1


def test_a_missing_tensor_is_refused_before_anything_is_written(checkpoint, tmp_path,
                                                                 monkeypatch):
    from shapes_vlm import export as exporter

    _, model = checkpoint
    real = exporter.mmproj_weights
    monkeypatch.setattr(exporter, "mmproj_weights",
                        lambda m: {k: v for k, v in real(m).items() if k != "mm.2.bias"})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=r"missing \['mm\.2\.bias'\]"):
        write_mmproj(model, out / "mmproj.gguf")
    assert list(out.iterdir()) == []

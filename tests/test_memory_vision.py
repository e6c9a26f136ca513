"""One copy of the vision weights whatever detail levels are used, and a memory estimate
that agrees with the measured peak (issue 17)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edge_vlm
from edge_vlm.config import load_settings
from edge_vlm.errors import GenerationError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "shapes-vlm"
# tiling_pair (conftest): the tiny SmolVLM pair, 64-px tiles, 256-px longest edge.


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo-mem") / "photo.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(path)
    return path


def _ask(vlm: edge_vlm.VLM, image: Path, detail: str) -> tuple[str, int]:
    reply = vlm.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(image), "detail": detail}},
        {"type": "text", "text": "What is this?"}]}], max_tokens=4, temperature=0)
    assert reply.timings is not None
    return str(reply.choices[0].message.content), reply.timings.image_tokens


def test_switching_detail_keeps_one_vision_context(tiling_pair, photo):
    model, mmproj = tiling_pair
    settings = load_settings({"cache.embedding_cache_mb": 0, "runtime.threads": 1,
                              "runtime.gpu": "off"})
    with edge_vlm.load(model, mmproj, settings=settings) as vlm:
        backend = vlm.engine.backend
        built = backend.mtmd_rebuilds  # the load made the default level's context (auto)
        high1 = _ask(vlm, photo, "high")
        low = _ask(vlm, photo, "low")
        high2 = _ask(vlm, photo, "high")
        # One context at a time, rebuilt on each change of level and only then.
        assert backend.vision_contexts == 1
        assert backend.mtmd_rebuilds == built + 3
        _ask(vlm, photo, "high")
        assert backend.mtmd_rebuilds == built + 3
    # The rebuilt context answers exactly as the first one did.
    assert high1 == high2
    assert low[1] < high1[1]
    with edge_vlm.load(model, mmproj, settings=settings) as fresh:
        assert _ask(fresh, photo, "low") == low


def test_a_prompt_tokenized_for_a_replaced_context_is_refused(tiling_pair, photo):
    from edge_vlm.backend import ImageChunk, RGBImage

    model, mmproj = tiling_pair
    with edge_vlm.load(model, mmproj, threads=1, gpu="off") as vlm:
        backend = vlm.engine.backend
        rgb = Image.open(photo).convert("RGB")
        img = RGBImage(rgb.width, rgb.height, rgb.tobytes(), "p")
        with backend.tokenize_prompt(f"{backend.marker} hi", [img], 16) as chunks:
            backend.mtmd_for(0)  # another request switched the level in between
            first = next(c for c in chunks.items if isinstance(c, ImageChunk))
            with pytest.raises(GenerationError, match="tokenize it again"):
                backend.encode_image(chunks, first)
        assert _ask(vlm, photo, "high")[1] > 0  # and the backend still works


PROBE = """
import json, sys
from pathlib import Path
import edge_vlm
from edge_vlm.preflight.memory import estimate_files
from edge_vlm.config import load_settings
model, mmproj, image = map(Path, sys.argv[1:4])
with edge_vlm.load(model, mmproj) as vlm:
    for detail in ("high", "low", "high"):
        vlm.chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(image), "detail": detail}},
            {"type": "text", "text": "What is this?"}]}], max_tokens=8, temperature=0)
status = Path("/proc/self/status").read_text().splitlines()
hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
print(json.dumps({"peak": hwm, "estimate": estimate_files(model, mmproj, load_settings()).total}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's VmHWM")
def test_the_memory_estimate_agrees_with_the_measured_peak(tmp_path, monkeypatch):
    """``models show``'s estimate within 15% of the peak RSS of a process that loads the
    shipped model and answers at every detail level (in a child: its peak is its own)."""
    for key in [k for k in __import__("os").environ if k.startswith("EDGE_VLM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("EDGE_VLM_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("EDGE_VLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGE_VLM_STORE__CHECK_LOAD", "false")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(SHIPPED / "model-q8_0.gguf"),
         str(SHIPPED / "mmproj-f16.gguf"), str(SHIPPED / "samples" / "photo-like.jpg")],
        capture_output=True, text=True, check=True, cwd=tmp_path)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.85 <= got["estimate"] / got["peak"] <= 1.15, got

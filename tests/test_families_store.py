"""`edge-vlm models import` recognises every family's pair; `models show` names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_vlm.testing import FAMILIES, tiny_pair

NAMES = ["llava", "smolvlm", "qwen2.5-vl", "qwen3-vl", "gemma-3", "internvl", "lfm2-vl",
         "moondream", "pixtral"]


@pytest.mark.parametrize("name", NAMES)
def test_import_and_show_name_the_family_and_projector(
        name: str, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_vlm.cli import main

    model, mmproj = tiny_pair(name, tmp_path)
    assert main(["models", "import", str(model), "--mmproj", str(mmproj),
                 "--name", f"tiny-{name}"]) == 0
    out = capsys.readouterr().out
    assert f"installed 'tiny-{name}'" in out
    assert main(["models", "show", f"tiny-{name}"]) == 0
    shown = capsys.readouterr().out
    assert f"family:         {name}\n" in shown
    assert f"vision:         {FAMILIES[name].projector} projector" in shown

"""One direction of dependency: front ends -> runtime -> backend (llama_cpp); the lower
layers (schema, images, config, errors, store, the GGUF reader) import none of the upper
ones. Checked two ways: what importing them loads (a fresh interpreter's sys.modules), and
every import in their source, deferred ones included (``tools/import_cycles.py``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import import_cycles  # noqa: E402

LOWER = ["edge_vlm.schema", "edge_vlm.images", "edge_vlm.image_source", "edge_vlm.config",
         "edge_vlm.errors",
         "edge_vlm.shipped", "edge_vlm.store", "edge_vlm.store.store", "edge_vlm.store.manifest",
         "edge_vlm.store.importer", "edge_vlm.store.catalog", "edge_vlm.store.fsutil",
         "edge_vlm.gguf.reader", "edge_vlm.gguf.validate"]
HEAVY = ["llama_cpp", "textual", "starlette", "uvicorn", "ray", "torch"]
UPPER = ["edge_vlm.backend", "edge_vlm.engine", "edge_vlm.api", "edge_vlm.loader",
         "edge_vlm.resolve", "edge_vlm.preflight", "edge_vlm.server", "edge_vlm.tui",
         "edge_vlm.batch", "edge_vlm.cli", "edge_vlm.prompt_images", "edge_vlm.diagnostics"]


@pytest.mark.parametrize("module", LOWER)
def test_importing_a_lower_layer_loads_no_runtime_ui_or_http(module):
    code = (f"import sys, json; import {module}\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    bad = sorted(m for m in loaded
                 if m.split(".")[0] in HEAVY or any(m == u or m.startswith(u + ".")
                                                    for u in UPPER))
    assert not bad, f"importing {module} loads {bad}"


def test_no_lower_module_imports_an_upper_one_even_inside_a_function():
    edges = import_cycles.graph(ROOT / "edge_vlm")
    lower = [m for m in edges if m in LOWER or m.startswith("edge_vlm.store.")
             or m.startswith("edge_vlm.gguf.reader")]
    lower = [m for m in lower if m != "edge_vlm.store.cli"]  # `edge-vlm models`: a front end
    wrong = {m: sorted(w for w in edges[m]
                       if any(w == u or w.startswith(u + ".") for u in UPPER))
             for m in lower}
    assert not {m: w for m, w in wrong.items() if w}


def test_no_lower_module_reads_the_settings_itself():
    # Settings are built once by the front end and passed down: a lower layer that calls
    # load_settings() would quietly ignore what the caller configured (issue #16).
    calls = []
    for path in sorted((ROOT / "edge_vlm").rglob("*.py")):
        module = import_cycles.module_name(ROOT / "edge_vlm", path)
        lower = (module in LOWER or module.startswith(("edge_vlm.store.", "edge_vlm.gguf.")))
        if not lower or module in ("edge_vlm.config", "edge_vlm.store.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", "")
                if name == "load_settings":
                    calls.append(f"{module}:{node.lineno}")
    assert calls == []


def _llama_cpp_importers(root: Path) -> list[str]:
    """``module:line`` of every ``import llama_cpp...`` / ``from llama_cpp... import`` under
    ``root``, deferred ones included."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = import_cycles.module_name(root, path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            if any(n == "llama_cpp" or n.startswith("llama_cpp.") for n in names):
                found.append(f"{module}:{node.lineno}")
    return found


def _outside_the_backend(found: list[str]) -> list[str]:
    """The ``module:line`` entries not in the ``edge_vlm.backend`` package."""
    modules = [f.partition(":")[0] for f in found]
    return [f for f, m in zip(found, modules, strict=True)
            if m != "edge_vlm.backend" and not m.startswith("edge_vlm.backend.")]


def test_only_the_backend_package_imports_llama_cpp():
    found = _llama_cpp_importers(ROOT / "edge_vlm")
    assert _outside_the_backend(found) == []
    # the scan does see the backend's own import of the library
    assert any(f.startswith("edge_vlm.backend._lib:") for f in found)


def test_the_llama_cpp_check_catches_a_module_outside_the_backend(tmp_path):
    pkg = tmp_path / "edge_vlm"
    (pkg / "backend").mkdir(parents=True)
    (pkg / "backend" / "__init__.py").write_text("import llama_cpp\n")
    (pkg / "backend" / "kv.py").write_text("import llama_cpp.mtmd_cpp as mtmd\n")
    (pkg / "backendish.py").write_text("import llama_cpp\n")
    (pkg / "engine.py").write_text("def f():\n    from llama_cpp.mtmd_cpp import x\n")
    found = _llama_cpp_importers(pkg)
    assert len(found) == 4
    assert _outside_the_backend(found) == ["edge_vlm.backendish:1", "edge_vlm.engine:2"]


def test_the_cli_modules_do_not_import_the_cli_back():
    edges = import_cycles.graph(ROOT / "edge_vlm")
    back = sorted(m for m, targets in edges.items()
                  if m != "edge_vlm.cli" and "edge_vlm.cli" in targets)
    assert not back, f"{back} import edge_vlm.cli (use edge_vlm.flags)"


def test_no_import_cycles_outside_other_owners_work_in_progress():
    edges = import_cycles.graph(ROOT / "edge_vlm")
    edges = {k: {w for w in v if w != "edge_vlm"} for k, v in edges.items()}
    found = import_cycles.cycles(edges)
    # Known and owned elsewhere (issue #16 notes): batch <-> api, the server's app/handlers.
    # batch's runner names the API's VLM type for the checker only (TYPE_CHECKING), and
    # VLM.batch calls into the runner; the server's handlers name the app's types the same
    # way. The chat template's child-process check renders the template with the same class
    # it guards (sandbox.py <-> template.py, both deferred).
    allowed = [{"edge_vlm.api", "edge_vlm.batch.runner"},
               {"edge_vlm.server.app", "edge_vlm.server.handlers"},
               {"edge_vlm.sandbox", "edge_vlm.template"}]
    assert [c for c in found if set(c) not in allowed] == []


def test_the_runtime_never_imports_the_gguf_writer_or_edge_vlm_testing():
    # PyPI's `gguf` is in the `testing`/`dev` extras only: writing test models is not a
    # runtime job, and a runtime import of it would fail on a plain `pip install edge-vlm`.
    found = []
    for path in sorted((ROOT / "edge_vlm").rglob("*.py")):
        module = import_cycles.module_name(ROOT / "edge_vlm", path)
        if module == "edge_vlm.testing" or module.startswith("edge_vlm.testing."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            found += [f"{module}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] == "gguf" or n.startswith("edge_vlm.testing")]
    assert found == []

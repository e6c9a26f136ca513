"""`edge-vlm batch` and `edge_vlm.batch.batch`: inputs, results file, resume, kills, schema.

Runs on the project's tiny random-weight model through real llama.cpp (gibberish answers,
real engine); the answer-correctness tests run on the shipped model when it is present.
"""

from __future__ import annotations

import csv
import json
import random
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from edge_vlm.batch import BatchItem, ResultWriter, batch, discover, read_manifest
from edge_vlm.batch.bench import benchmark, make_shapes_images
from edge_vlm.batch.inputs import BatchInputError, read_schema_file
from edge_vlm.batch.resume import ResumeIndex
from edge_vlm.cli import main as cli_main
from edge_vlm.errors import ModelNotFoundError
from edge_vlm.testing import Pair

ROOT = Path(__file__).resolve().parent.parent

SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "enum": ["circle", "square", "triangle", "star", "cross"]},
        "count": {"type": "integer"},
    },
    "required": ["shape", "count"],
    "additionalProperties": False,
}


# -- helpers ---------------------------------------------------------------------------


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` distinct small PNGs: a random background with a random box."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (72 + 8 * (i % 3), 60), tuple(rng.randrange(256) for _ in "rgb"))
        box = (rng.randrange(30), rng.randrange(25), 40 + rng.randrange(30), 35 + rng.randrange(25))
        ImageDraw.Draw(img).rectangle(box, fill=tuple(rng.randrange(256) for _ in "rgb"))
        path = folder / f"img{i}.png"
        img.save(path)
        paths.append(path)
    return paths


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def model_flags(paths: Pair) -> list[str]:
    return ["--model", str(paths.model), "--mmproj", str(paths.mmproj), "--threads", "1"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli_main(["batch", *argv, "--no-progress"])
    return rc, capsys.readouterr().err


def validates(value: Any, schema: dict[str, Any]) -> bool:
    """The subset of JSON Schema used here (no jsonschema package in the venv)."""
    kind = schema.get("type")
    if "enum" in schema and value not in schema["enum"]:
        return False
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict)
                and all(k in value for k in schema.get("required", []))
                and (schema.get("additionalProperties", True) or set(value) <= set(props))
                and all(validates(v, props[k]) for k, v in value.items() if k in props))
    return True


def ask(vlm: Any, image: Path, prompt: str, **kw: Any) -> str:
    reply = vlm.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(image)}},
        {"type": "text", "text": prompt}]}], **kw)
    return str(reply.choices[0].message.content)


@pytest.fixture
def vlm(tiny_vlm: Any) -> Any:
    """The session's tiny pair, loaded once (conftest); tests that compare answers reset it."""
    return tiny_vlm


# -- inputs ----------------------------------------------------------------------------


def test_folder_discovery_is_natural_ordered_and_skips_non_images(tmp_path: Path) -> None:
    for name in ("img10.png", "img2.jpg", "img1.PNG", "scan.tiff", "notes.txt", ".hidden.png",
                 "results.jsonl"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.webp").write_bytes(b"x")
    names = [p.path.name for p in discover([tmp_path])]
    # TIFF is kept so that it becomes an error line ("unsupported"), not a silent omission.
    assert names == ["img1.PNG", "img2.jpg", "img10.png", "scan.tiff"]
    deep = [p.path.name for p in discover([tmp_path], recursive=True)]
    assert deep == [*names, "deep.webp"]
    # An image named twice is kept once.
    assert len(discover([tmp_path, tmp_path / "img2.jpg"])) == 4
    with pytest.raises(BatchInputError, match="does not exist"):
        discover([tmp_path / "nope"])


def test_manifests_group_prompts_per_image_relative_to_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    jsonl = tmp_path / "m" / "list.jsonl"
    jsonl.write_text('{"image": "a.png", "prompt": "Q1"}\n\n"b.png"\n'
                     '{"image": "a.png", "prompts": ["Q2", "Q1"]}\n', encoding="utf-8")
    items = read_manifest(jsonl)
    assert [(i.path, i.prompts) for i in items] == [
        (tmp_path / "m" / "a.png", ("Q1", "Q2")), (tmp_path / "m" / "b.png", ())]

    table = tmp_path / "list.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["image", "prompt"], ["x.png", "What, exactly?"], ["/abs/y.png", ""],
                     ["x.png", "More?"]])
    items = read_manifest(table)
    assert [(str(i.path), i.prompts) for i in items] == [
        (str(tmp_path / "x.png"), ("What, exactly?", "More?")), ("/abs/y.png", ())]

    jsonl.write_text('{"image": "a.png"}\n{"img": "b.png"}\n', encoding="utf-8")
    with pytest.raises(BatchInputError, match=r"list\.jsonl line 2: no image path"):
        read_manifest(jsonl)
    jsonl.write_text('{"image": "https://example.com/a.png"}\n', encoding="utf-8")
    with pytest.raises(BatchInputError, match="local image files only"):
        read_manifest(jsonl)


def test_schema_file_accepts_a_bare_schema_or_openai_wrappers(tmp_path: Path) -> None:
    f = tmp_path / "s.json"
    for doc in (SCHEMA, {"name": "x", "schema": SCHEMA},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}):
        f.write_text(json.dumps(doc))
        assert read_schema_file(f) == SCHEMA
    f.write_text("{nope")
    with pytest.raises(BatchInputError, match="not valid JSON"):
        read_schema_file(f)


# -- results file ----------------------------------------------------------------------


def record(key: str, error: Any = None) -> dict[str, Any]:
    return {"path": "a.png", "prompt": "Q", "key": key, "answer": "A", "error": error}


def test_resume_cuts_a_torn_last_line_and_retries_failed_answers(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    with ResultWriter.open(out) as w:
        w.write(record("k1"))
    with out.open("ab") as f:
        f.write(b'{"path": "a.png", "prompt": "Q", "ke')  # killed in the middle of a write
    with ResultWriter.open(out, resume=True) as w:
        assert (w.kept, w.dropped, w.truncated) == (1, 0, 36)
        assert w.index.take("k1") is not None
        w.write(record("k2", {"type": "GenerationError", "message": "llama.cpp failed"}))
        w.write(record("k3"))
    assert [r["key"] for r in lines(out)] == ["k1", "k2", "k3"]
    with ResultWriter.open(out, resume=True) as w:
        assert (w.kept, w.dropped, w.truncated) == (2, 1, 0)
        assert w.index.take("k2") is None  # failed: to be retried, its line is gone
        w.write(record("k2"))
    assert [(r["key"], r["error"]) for r in lines(out)] == [
        ("k1", None), ("k3", None), ("k2", None)]
    assert not list(tmp_path.glob(".*resume-tmp"))


def test_results_file_is_never_clobbered_or_shared(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    with ResultWriter.open(out) as w:
        w.write(record("k1"))
        with pytest.raises(BatchInputError, match="another edge-vlm batch"):
            ResultWriter.open(out, resume=True)
    with pytest.raises(BatchInputError, match="--resume to continue"):
        ResultWriter.open(out)
    with ResultWriter.open(out, overwrite=True) as w:
        assert len(w.index) == 0
    assert out.read_bytes() == b""
    out.write_text("not json\n")
    with pytest.raises(BatchInputError, match=r"line 1 .* not an edge-vlm batch result"):
        ResultWriter.open(out, resume=True)


def test_resume_index_is_a_multiset() -> None:
    index = ResumeIndex()
    index.add(record("same"))
    index.add(record("same"))
    assert index.take("same") and index.take("same")
    assert index.take("same") is None and len(index) == 0


# -- the Python API on the tiny model --------------------------------------------------


def test_batch_answers_equal_single_chats_and_encode_each_image_once(vlm: Any,
                                                                     tmp_path: Path) -> None:
    paths = make_images(tmp_path, 2, seed=1)
    prompts = ["What shape is in the image?", "How many shapes are there?", "Describe it."]
    vlm.engine.reset()
    vlm.engine.cache.clear()
    results = list(batch(vlm, paths, prompts, max_tokens=6, temperature=0))
    assert [(r.path, r.prompt) for r in results] == [(p, q) for p in paths for q in prompts]
    assert all(r.status == "ok" and r.finish_reason == "length" for r in results)
    for r in results:
        encoded_here = r.prompt_index == 0
        assert r.timings is not None
        assert r.timings.images[0].cache_hit is not encoded_here
        assert (r.timings.image_encode_ms > 0) is encoded_here
        assert r.last_for_image is (r.prompt_index == 2)
    # The batch's ordering and prefix reuse do not change any answer.
    for r in results:
        assert r.answer == ask(vlm, r.path, r.prompt, max_tokens=6, temperature=0)
    assert len({r.answer for r in results if r.prompt_index == 0}) == 2


def test_identical_files_each_get_their_line_across_a_stop_and_resume(vlm: Any,
                                                                      tmp_path: Path) -> None:
    a, c = make_images(tmp_path, 2, seed=2)
    b = tmp_path / "copy-of-img0.png"
    b.write_bytes(a.read_bytes())
    out = tmp_path / "out.jsonl"
    stop = threading.Event()
    first = []
    for r in batch(vlm, [a, b, c], ["Q?"], max_tokens=3, out=out, stop=stop):
        first.append(r)
        stop.set()  # as a Ctrl+C during the first answer: the run ends after it
    assert [r.path for r in first] == [a]
    again = list(batch(vlm, [a, b, c], ["Q?"], max_tokens=3, out=out, resume=True))
    assert [(r.path, r.status) for r in again] == [(a, "skipped"), (b, "ok"), (c, "ok")]
    got = lines(out)
    assert [r["path"] for r in got] == [str(a), str(b), str(c)]
    assert got[0]["image_sha256"] == got[1]["image_sha256"] != got[2]["image_sha256"]


def test_conversation_mode_resumes_from_recorded_answers(vlm: Any, tmp_path: Path) -> None:
    (img,) = make_images(tmp_path, 1, seed=3)
    prompts = ["What shape?", "How many?", "Where?"]
    whole = list(batch(vlm, [img], prompts, conversation=True, max_tokens=5, temperature=0))
    # Turn 2 is the same as asking it after turn 1 in one conversation.
    image_part = {"type": "image_url", "image_url": {"url": str(img)}}
    reply = vlm.chat([
        {"role": "user", "content": [image_part, {"type": "text", "text": prompts[0]}]},
        {"role": "assistant", "content": whole[0].text},
        {"role": "user", "content": prompts[1]}], max_tokens=5, temperature=0)
    assert whole[1].answer == reply.choices[0].message.content
    out = tmp_path / "conv.jsonl"
    stop = threading.Event()
    for _ in batch(vlm, [img], prompts, conversation=True, max_tokens=5, temperature=0,
                   out=out, stop=stop):
        stop.set()
    assert len(lines(out)) == 1
    resumed = list(batch(vlm, [img], prompts, conversation=True, max_tokens=5, temperature=0,
                         out=out, resume=True))
    assert [r.status for r in resumed] == ["skipped", "ok", "ok"]
    assert [r["answer"] for r in lines(out)] == [r.answer for r in whole]
    # A different conversation (another first prompt) is different work, not a resume.
    other = list(batch(vlm, [img], ["Describe.", *prompts[1:]], conversation=True,
                       max_tokens=5, temperature=0, out=out, resume=True))
    assert [r.status for r in other] == ["ok", "ok", "ok"]


def test_bad_inputs_are_refused_before_any_work(vlm: Any, tmp_path: Path) -> None:
    (img,) = make_images(tmp_path, 1, seed=4)
    with pytest.raises(BatchInputError, match="no prompt for image"):
        batch(vlm, [img], [])
    with pytest.raises(BatchInputError, match="empty"):
        batch(vlm, [img], ["ok", "  "])
    with pytest.raises(BatchInputError, match="--schema"):
        batch(vlm, [img], ["Q"], schema={"type": "object", "properties": {"a": {"$ref": "#/x"}}})
    # Per-image prompts are enough on their own.
    (r,) = batch(vlm, [BatchItem(img, ("Only this?",))], [], max_tokens=2)
    assert r.prompt == "Only this?" and r.ok


def test_benchmark_entry_encodes_each_image_once(vlm: Any, tmp_path: Path) -> None:
    paths = make_shapes_images(tmp_path, 3, size=(96, 96))
    result = benchmark(vlm, paths, max_tokens=3)
    assert (result.images, result.prompts, result.answers, result.failed) == (3, 3, 9, 0)
    assert (result.image_encodes, result.cache_hits) == (3, 6)
    assert result.images_per_min > 0


# -- the command on the tiny model -----------------------------------------------------


def test_corrupt_and_unsupported_images_become_error_lines(tiny_paths: Pair,
                                                           tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    folder = tmp_path / "imgs"
    good = make_images(folder, 3, seed=5)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (folder / "fake.jpg").write_text("this is not a picture, it is text\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "readme.txt").write_text("ignored")
    out = tmp_path / "out.jsonl"
    before = signal.getsignal(signal.SIGINT)
    rc, err = run_cli(capsys, str(folder), "-p", "What shape?", "-p", "How many?",
                      "--max-tokens", "4", "--out", str(out), *model_flags(tiny_paths))
    assert rc == 1
    assert "6 of 12 answers failed" in err
    got = lines(out)
    assert len(got) == 12
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in got:
        by_name.setdefault(Path(r["path"]).name, []).append(r)
    assert set(by_name) == {"broken.png", "fake.jpg", "empty.png", *(p.name for p in good)}
    for p in good:
        assert all(r["error"] is None and isinstance(r["answer"], str) for r in by_name[p.name])
    assert by_name["fake.jpg"][0]["error"]["type"] == "UnsupportedImageError"
    assert "empty" in by_name["empty.png"][0]["error"]["message"]
    assert "corrupt" in by_name["broken.png"][0]["error"]["message"]
    assert all(r["answer"] is None for n in ("broken.png", "fake.jpg", "empty.png")
               for r in by_name[n])
    # One line on the terminal per bad image, naming it.
    assert err.count("broken.png") == 1 and err.count("fake.jpg") == 1
    # The run's Ctrl+C handler is gone again: whatever was there before is back (a shell
    # that starts a job in the background makes that SIG_IGN, not the default handler).
    assert signal.getsignal(signal.SIGINT) is before


def test_schema_run_writes_parsed_json_that_validates(tiny_paths: Pair, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "imgs"
    make_images(folder, 3, seed=6)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps({"name": "shape", "schema": SCHEMA}))
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# one question a line\n\nWhat shape and how many?\n")
    out = tmp_path / "out.jsonl"
    rc, err = run_cli(capsys, str(folder), "--prompts-file", str(prompts_file), "--schema",
                      str(schema_file), "--system", "Answer in JSON.", "--max-tokens", "160",
                      "--out", str(out), *model_flags(tiny_paths))
    assert rc == 0, err
    got = lines(out)
    assert len(got) == 3
    assert {r["prompt"] for r in got} == {"What shape and how many?"}
    for r in got:
        assert isinstance(r["answer"], dict) and validates(r["answer"], SCHEMA), r["answer"]


def test_usage_errors_exit_2_before_loading_the_model(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    make_images(tmp_path / "imgs", 1)
    missing_model = ["--model", str(tmp_path / "no-model.gguf")]  # never reached
    out = str(tmp_path / "o.jsonl")
    rc, err = run_cli(capsys, str(tmp_path / "imgs"), "--out", out, *missing_model)
    assert rc == 2 and "no prompt" in err
    rc, err = run_cli(capsys, str(tmp_path / "empty-dir-missing"), "-p", "Q", "--out", out)
    assert rc == 2 and "does not exist" in err
    (tmp_path / "none").mkdir()
    rc, err = run_cli(capsys, str(tmp_path / "none"), "-p", "Q", "--out", out)
    assert rc == 2 and "no images found" in err and "--recursive" in err
    rc, err = run_cli(capsys, str(tmp_path / "imgs"), "-p", "Q", "--out", out,
                      "--max-tokens", "0")
    assert rc == 2 and "--max-tokens" in err


# -- the real command in a subprocess: SIGKILL and Ctrl+C ------------------------------


@pytest.fixture(scope="module")
def shipped() -> Any:
    from edge_vlm.resolve import resolve_model

    try:
        return resolve_model("default")
    except ModelNotFoundError as err:
        pytest.skip(f"needs the shipped model, which is not there yet (being trained): {err}")


def shapes_scenes(folder: Path, n: int, seed: int) -> list[tuple[Path, Any]]:
    from shapes_vlm.render import render
    from shapes_vlm.world import sample_scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = sample_scene(rng, n_shapes=1 if i % 2 == 0 else None)
        path = folder / f"scene{i:02d}.png"
        render(scene).save(path)
        out.append((path, scene))
    return out


def test_shipped_model_batch_answers_are_correct(shipped: Any, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from shapes_vlm.world import answer

    scenes = shapes_scenes(tmp_path / "imgs", 12, seed=2024)
    # "What shape" only for one-shape scenes (a manifest prompt); the count for all (--prompt).
    manifest = tmp_path / "scenes.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "prompt"])
        for path, scene in scenes:
            w.writerow([f"imgs/{path.name}",
                        "What shape is in the image?" if len(scene.shapes) == 1 else ""])
    out = tmp_path / "out.jsonl"
    rc, err = run_cli(capsys, str(manifest), "-p", "How many shapes are there?",
                      "--max-tokens", "24", "--temperature", "0", "--out", str(out),
                      "--model", "default")
    assert rc == 0, err
    got = lines(out)
    expected = {}
    for path, scene in scenes:
        expected[(path.name, "How many shapes are there?")] = answer(scene, "count")
        if len(scene.shapes) == 1:
            expected[(path.name, "What shape is in the image?")] = answer(scene, "shape")
    answers = {(Path(r["path"]).name, r["prompt"]): r["answer"].strip() for r in got}
    assert set(answers) == set(expected) and len(got) == len(expected)
    right = sum(answers[k] == v for k, v in expected.items())
    assert right >= 0.9 * len(expected), [(k, answers[k], v) for k, v in expected.items()
                                          if answers[k] != v]


def test_shipped_model_schema_run_validates(shipped: Any, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    scenes = shapes_scenes(tmp_path / "imgs", 4, seed=99)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    out = tmp_path / "out.jsonl"
    rc, err = run_cli(capsys, str(tmp_path / "imgs"), "-p", "What shape is in the image?",
                      "--schema", str(schema_file), "--max-tokens", "64", "--out", str(out),
                      "--model", "default")
    assert rc == 0, err
    got = lines(out)
    assert len(got) == len(scenes)
    assert all(validates(r["answer"], SCHEMA) for r in got), [r["answer"] for r in got]

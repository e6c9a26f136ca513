"""Tests of edge_vlm.gguf (bounded reader, validators, vocabulary) on files written by
llama.cpp's `gguf` package through edge_vlm.testing, and on hostile bytes."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_vlm.errors import ModelLoadError, ModelNotFoundError
from edge_vlm.gguf import (
    SPACE,
    ArraySummary,
    GGMLType,
    GGUFInfo,
    GGUFValueType,
    TokenType,
    build_spm_vocab,
    mmproj_output_width,
    read_gguf,
    text_embedding_width,
    validate_mmproj,
    validate_text_model,
)
from edge_vlm.testing import FAMILIES, Pair, family_vocab, variant, write_pair

V = GGUFValueType
CHAT_SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def _rewrite(
    info: GGUFInfo,
    out: Path,
    *,
    drop_tensor: str = "",
    kv: dict[str, Any] | None = None,
    types: dict[str, GGUFValueType] | None = None,
) -> Path:
    """Copy a (small) GGUF file with llama.cpp's ``gguf`` writer, dropping a tensor or
    replacing metadata values/types: hostile input for the validators."""
    import gguf

    w = gguf.GGUFWriter(out, str(info.metadata["general.architecture"]))
    kv, types = kv or {}, types or {}
    for key, value in info.metadata.items():
        if key in ("general.alignment", "general.architecture"):
            continue
        assert not isinstance(value, ArraySummary), "rewrite only files with short arrays"
        vtype, etype = info.value_types[key]
        w.add_key_value(key, kv.get(key, value), gguf.GGUFValueType(int(types.get(key, vtype))),
                        None if etype is None else gguf.GGUFValueType(int(etype)))
    raw = info.path.read_bytes()
    for t in info.tensors.values():
        if t.name == drop_tensor:
            continue
        dt = {GGMLType.F32: "<f4", GGMLType.F16: "<f2"}[t.ggml_type]
        arr = np.frombuffer(raw, dt, count=t.nbytes // np.dtype(dt).itemsize, offset=t.offset)
        w.add_tensor(t.name, arr.reshape(tuple(reversed(t.shape))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _header(*, version: int = 3, n_tensors: int = 0, n_kv: int = 0, body: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body


def _gguf_str(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def _tensor_entry(name: str, ne: list[int], gtype: int = 0, offset: int = 0) -> bytes:
    return _gguf_str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, gtype, offset)


# -- what llama.cpp's gguf writer writes, the bounded reader reads ---------------------------


def test_reader_reads_every_value_type_and_tensor_layout(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "rt.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("a.u32", 7)
    w.add_int32("a.i32", -3)
    w.add_uint64("a.u64", 2**40)
    w.add_float32("a.f32", 0.5)
    w.add_bool("a.bool", True)
    w.add_string("a.str", "héllo {{ x }}")
    w.add_array("a.floats", [0.25, 0.5, 0.75])
    w.add_array("a.strs", ["x", "▁y", ""])
    w.add_key_value("a.long", list(range(1000)), gguf.GGUFValueType.ARRAY,
                    gguf.GGUFValueType.INT32)
    rng = np.random.default_rng(0)
    mats = {
        "m2": rng.standard_normal((3, 5)).astype(np.float16),
        "v1": rng.standard_normal(7).astype(np.float32),
        "c4": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
    }
    for name, arr in mats.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    info = read_gguf(path)
    md = info.metadata
    assert (md["a.u32"], md["a.i32"], md["a.u64"], md["a.bool"]) == (7, -3, 2**40, True)
    assert md["a.f32"] == 0.5 and md["a.str"] == "héllo {{ x }}"
    assert md["a.floats"] == [0.25, 0.5, 0.75] and md["a.strs"] == ["x", "▁y", ""]
    assert md["a.long"] == ArraySummary(V.INT32, 1000)
    assert info.value_types["a.u32"] == (V.UINT32, None)
    assert info.value_types["a.strs"] == (V.ARRAY, V.STRING)
    assert info.alignment == 32
    raw = path.read_bytes()
    for name, arr in mats.items():
        t = info.tensors[name]
        assert t.shape == tuple(reversed(arr.shape))  # ggml ne order
        assert t.ggml_type == (GGMLType.F16 if name == "m2" else GGMLType.F32)
        assert t.offset % 32 == 0
        got = np.frombuffer(raw, arr.dtype.newbyteorder("<"), count=arr.size,
                            offset=t.offset).reshape(arr.shape)
        np.testing.assert_array_equal(got, arr)
    assert list(info.tensors) == ["m2", "v1", "c4"]


# -- vocabulary -----------------------------------------------------------------------------


def test_vocab_layout_and_special_tokens() -> None:
    v = build_spm_vocab(["▁red", "▁read"], CHAT_SPECIAL_TOKENS, newline_tokens=True, eot="<|end|>")
    assert v.tokens[:3] == ["<unk>", "<s>", "</s>"] and v.tokens[3] == "<0x00>"
    assert v.tokens[3 + 0x0A] == "<0x0A>" and v.token_types[3 + 255] == TokenType.BYTE
    assert len(set(v.tokens)) == len(v.tokens)
    end = v.token_id("<|end|>")
    assert v.eot_id == end and v.token_types[end] == TokenType.CONTROL
    assert "\n" in v and "\n\n" in v
    assert v.tokenize("<|user|>red<|end|>") == [v.token_id("<|user|>"), v.token_id("▁red"), end]
    assert v.detokenize(v.tokenize("read the red", add_bos=True)) == " read the red"
    with pytest.raises(ValueError, match="after its start"):
        build_spm_vocab(["▁two▁words"])


@pytest.mark.parametrize("seed", range(5))
def test_vocab_every_word_is_one_token(seed: int) -> None:
    # A tiny alphabet makes words share prefixes and inner pairs, the hard case for merging.
    rng = random.Random(seed)
    words = {
        ("▁" if rng.random() < 0.7 else "") + "".join(rng.choices("abc", k=rng.randint(1, 7)))
        for _ in range(40)
    }
    v = build_spm_vocab(sorted(words))
    spaced = sorted(w for w in words if w.startswith(SPACE))
    for w in spaced:
        assert v.tokenize(w[1:]) == [v.token_id(w)], w  # the tokenizer adds the space
    sentence = "".join(spaced).replace(SPACE, " ").lstrip()
    assert v.tokenize(sentence) == [v.token_id(w) for w in spaced]


# -- the tiny pairs of edge_vlm.testing --------------------------------------------------


def test_a_vision_spec_llama_cpp_would_misread_is_refused() -> None:
    with pytest.raises(ValueError, match="swap"):
        variant("generic", vision={"n_ff": 64})  # n_ff == n_embd: clip.cpp swaps up/down


def test_idefics3_mmproj_validates(tiling_pair: Pair) -> None:
    info = read_gguf(tiling_pair.mmproj)
    validate_mmproj(info)
    assert mmproj_output_width(info) == 256
    assert info.tensors["mm.model.fc.weight"].shape == (64 * 4, 256)  # pixel shuffle by 2
    assert info.tensors["v.patch_embd.weight"].ggml_type == GGMLType.F32
    assert info.metadata["clip.vision.projector.scale_factor"] == 2


def test_tiny_vlm_is_valid_and_deterministic(tmp_path: Path, tiny_paths: Pair) -> None:
    model, mmproj = read_gguf(tiny_paths.model), read_gguf(tiny_paths.mmproj)
    validate_text_model(model)
    validate_mmproj(mmproj)
    assert text_embedding_width(model) == mmproj_output_width(mmproj) == 256
    assert tiny_paths.model.stat().st_size + tiny_paths.mmproj.stat().st_size < 8_000_000
    again = write_pair(FAMILIES["generic"], tmp_path)
    assert again.model.read_bytes() == tiny_paths.model.read_bytes()
    assert again.mmproj.read_bytes() == tiny_paths.mmproj.read_bytes()
    odd = write_pair(variant("generic", vision={"n_embd_text": 128}), tmp_path, prefix="odd-")
    assert mmproj_output_width(read_gguf(odd.mmproj)) == 128


def test_writing_into_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_pair(FAMILIES["generic"], tmp_path / "nope")


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_vlm.testing import writer

    arrays = writer._vision_arrays

    def disk_full(*args: Any) -> Iterator[tuple[str, np.ndarray]]:  # a fake full disk
        yield next(arrays(*args))
        raise OSError(28, "No space left on device")

    (tmp_path / "mmproj.gguf").write_bytes(b"old")
    monkeypatch.setattr(writer, "_vision_arrays", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_pair(FAMILIES["generic"], tmp_path)
    assert (tmp_path / "mmproj.gguf").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmproj.gguf", "model.gguf"]
    validate_text_model(read_gguf(tmp_path / "model.gguf"))  # written whole before the failure


# -- broken files ---------------------------------------------------------------------------


_BROKEN: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "empty"),
    "zip": (b"PK\x03\x04" + b"\0" * 60, r"not a GGUF file \(starts with b'PK\\x03\\x04'\).*ZIP"),
    "html": (b"<!DOCTYPE html><html>", "not a GGUF file.*HTML"),
    "lfs-pointer": (b"version https://git-lfs.github.com/spec/v1\n", "git lfs pull"),
    "version-4": (_header(version=4), "unsupported GGUF version 4"),
    "version-1": (_header(version=1), "v1 is obsolete"),
    "big-endian": (_header(version=3 << 24), "big-endian"),
    "short-header": (b"GGUF\x03\0", "truncated"),
    "absurd-kv-count": (_header(n_kv=2**40), "claims 1099511627776 metadata entries"),
    "absurd-tensor-count": (_header(n_tensors=2**63), "claims 9223372036854775808 tensors"),
    "unknown-value-type": (
        _header(n_kv=1, body=_gguf_str("k") + struct.pack("<I", 99) + b"\0" * 16),
        "unknown type",
    ),
    "huge-string-array": (
        _header(n_kv=1, body=_gguf_str("k") + struct.pack("<IIQ", 9, 8, 2**50) + b"\0" * 8),
        "claims 1125899906842624 strings",
    ),
    "shape-overflow": (
        _header(n_tensors=1, body=_tensor_entry("t", [2**62, 2**62]) + b"\0" * 32),
        "overflows",
    ),
    "five-dims": (
        _header(n_tensors=1, body=_tensor_entry("t", [4, 4, 4, 4, 4]) + b"\0" * 32),
        "5 dimensions",
    ),
    "retired-type": (
        _header(n_tensors=1, body=_tensor_entry("t", [4], gtype=4) + b"\0" * 32),
        "unknown ggml type 4",
    ),
    "partial-block": (
        _header(n_tensors=1, body=_tensor_entry("t", [33], gtype=8) + b"\0" * 32),
        "not a multiple of the Q8_0 block size 32",
    ),
    "data-past-end": (
        _header(n_tensors=1, body=_tensor_entry("t", [1024]) + b"\0" * 64),
        r"truncated: tensor 't' ends at byte 4160 but the file has 121 bytes",
    ),
    "offset-gap": (
        _header(n_tensors=1, body=_tensor_entry("t", [4], offset=64) + b"\0" * 64),
        "has data offset 64, expected 0",
    ),
    "duplicate-tensor": (
        _header(n_tensors=2, body=_tensor_entry("t", [4]) * 2 + b"\0" * 64),
        "appears twice",
    ),
}


@pytest.mark.parametrize(("content", "message"), list(_BROKEN.values()), ids=list(_BROKEN))
def test_broken_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        read_gguf(path)


def test_truncated_at_many_points(tmp_path: Path, tiny_paths: Pair) -> None:
    data = tiny_paths.mmproj.read_bytes()
    info = read_gguf(tiny_paths.mmproj)
    cuts = [2, 9, 30, 200, info.data_offset - 1, info.data_offset + 5000, len(data) - 1]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=r"truncated|not a GGUF"):
            read_gguf(path)
    last = list(info.tensors)[-1]
    with pytest.raises(
        ModelLoadError,
        match=f"tensor '{last}' ends at byte {len(data)} but the file has {len(data) - 1} bytes",
    ):
        read_gguf(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="directory"):
        read_gguf(tmp_path)


def test_model_and_mmproj_swapped(tiny_paths: Pair) -> None:
    with pytest.raises(
        ModelLoadError,
        match=r"is a language model \(architecture 'llama'\), "
        "not an mmproj: pass it as --model",
    ):
        validate_mmproj(read_gguf(tiny_paths.model))
    with pytest.raises(ModelLoadError, match=r"is an mmproj.*pass it as --mmproj"):
        validate_text_model(read_gguf(tiny_paths.mmproj))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(drop_tensor="mm.2.weight"), "lacks tensor 'mm.2.weight' required by the 'mlp'"),
        (dict(drop_tensor="v.blk.1.attn_k.weight"), "lacks tensor 'v.blk.1.attn_k.weight'"),
        (dict(kv={"clip.has_vision_encoder": False}), "has no vision encoder"),
        (dict(types={"clip.vision.image_size": V.INT32}), "image_size is stored as int32"),
        (dict(kv={"clip.vision.patch_size": 8}), "'v.patch_embd.weight' has shape"),
    ],
)
def test_broken_mmproj(
    tmp_path: Path, tiny_paths: Pair, change: dict[str, Any], message: str
) -> None:
    path = _rewrite(read_gguf(tiny_paths.mmproj), tmp_path / "p.gguf", **change)
    with pytest.raises(ModelLoadError, match=message):
        validate_mmproj(read_gguf(path))


def test_broken_text_model(tmp_path: Path, tiny_paths: Pair) -> None:
    info = read_gguf(tiny_paths.model, max_array_items=10_000)
    path = _rewrite(info, tmp_path / "m.gguf", drop_tensor="blk.1.ffn_up.weight")
    with pytest.raises(ModelLoadError, match=r"lacks tensor 'blk.1.ffn_up.weight'"):
        validate_text_model(read_gguf(path))


# -- through llama.cpp (via the runtime's backend, the one module that imports llama_cpp) ------


@pytest.fixture(scope="module")
def backend(tiny_paths: Pair) -> Iterator[Any]:
    from edge_vlm.backend import Backend, BackendConfig

    b = Backend(BackendConfig(model_path=tiny_paths.model, mmproj_path=tiny_paths.mmproj, n_ctx=512,
                              n_batch=256, threads=1, n_gpu_layers=0, mmproj_use_gpu=False,
                              flash_attn="auto"))
    yield b
    b.close()


def test_llama_cpp_tokenizes_words_and_end_as_single_tokens(backend: Any) -> None:
    v = family_vocab("generic")
    assert backend.tokenize_text("Describe the picture", add_special=False,
                                 parse_special=True) == [
        v.token_id("▁Describe"),
        v.token_id("▁the"),
        v.token_id("▁picture"),
    ]
    end = backend.tokenize_text("<|end|>", add_special=False, parse_special=True)
    assert end == [v.token_id("<|end|>")] and backend.is_eog(end[0])
    assert not backend.is_eog(v.token_id("▁the"))


@pytest.mark.parametrize(
    "text",
    [
        "What is this?",
        "<|user|>a red circle<|end|><|assistant|>",
        "héllo\n\nworld  two  spaces",
        "<s>x</s>",
        "ñ 日本 🙂",
        "",
    ],
)
def test_python_tokenizer_matches_llama_cpp(backend: Any, text: str) -> None:
    assert family_vocab("generic").tokenize(text, add_bos=True) == backend.tokenize_text(
        text, add_special=True, parse_special=True)


# -- the families of edge_vlm.testing: validator tables --------------------------------

FAMILY_NAMES = ["llava", "smolvlm", "qwen2.5-vl", "qwen3-vl", "gemma-3", "internvl",
                "lfm2-vl", "moondream", "pixtral"]


def _family_pair(tmp_path: Path, name: str, drop: str | None = None) -> tuple[Path, Path]:
    """A family's tiny pair, optionally without one mmproj tensor."""
    import dataclasses

    from edge_vlm.testing import FAMILIES, write_pair
    from edge_vlm.testing.specs import VisionSpec

    fam = FAMILIES[name]
    if drop is not None:

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Without(VisionSpec):
            def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
                shapes = super().tensor_shapes()
                assert drop in shapes, f"{drop} is not a tensor of {name}"
                del shapes[drop]
                return shapes

        fields = {f.name: getattr(fam.vision, f.name) for f in dataclasses.fields(VisionSpec)}
        fam = dataclasses.replace(fam, vision=Without(**fields))
    return write_pair(fam, tmp_path)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_each_family_pair_passes_the_validators(tmp_path: Path, name: str) -> None:
    from edge_vlm.gguf.families import family_name
    from edge_vlm.testing import FAMILIES

    model, mmproj = _family_pair(tmp_path, name)
    text, proj = read_gguf(model), read_gguf(mmproj)
    validate_text_model(text)
    validate_mmproj(proj)
    assert mmproj_output_width(proj) == text_embedding_width(text) == 256
    fam = FAMILIES[name]
    assert family_name(fam.projector, fam.text.arch) == name


@pytest.mark.parametrize(("name", "tensor"), [
    ("smolvlm", "mm.model.fc.weight"),
    ("qwen2.5-vl", "v.patch_embd.weight.1"),
    ("qwen2.5-vl", "mm.2.bias"),
    ("qwen3-vl", "v.position_embd.weight"),
    ("qwen3-vl", "v.blk.1.ffn_down.weight"),
    ("gemma-3", "mm.input_projection.weight"),
    ("gemma-3", "mm.soft_emb_norm.weight"),
    ("internvl", "v.class_embd"),
    ("internvl", "mm.model.mlp.3.weight"),
    ("lfm2-vl", "mm.1.weight"),
    ("pixtral", "v.token_embd.img_break"),
    ("pixtral", "v.blk.0.attn_k.weight"),
])
def test_a_family_mmproj_missing_a_tensor_is_refused_by_name(tmp_path: Path, name: str,
                                                             tensor: str) -> None:
    _, mmproj = _family_pair(tmp_path, name, drop=tensor)
    with pytest.raises(ModelLoadError, match=f"lacks tensor '{tensor}'"):
        validate_mmproj(read_gguf(mmproj))


def test_family_names_from_metadata() -> None:
    from edge_vlm.gguf.families import family_name

    assert family_name("qwen2.5vl_merger", "qwen2vl") == "qwen2.5-vl"
    assert family_name("mlp", "llama") == "llava"
    assert family_name("mlp", "phi2") == "moondream"
    assert family_name("somethingnew") == "somethingnew"
    assert family_name("") == "unknown"

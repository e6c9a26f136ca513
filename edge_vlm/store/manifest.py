"""One manifest per installed model: its two files (by sha256), where it came from, and the
facts read from the GGUF headers that ``models list`` / ``show`` and the memory estimate use.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edge_vlm.errors import StoreError
from edge_vlm.gguf.constants import GGMLType
from edge_vlm.gguf.reader import ArraySummary, GGUFInfo
from edge_vlm.gguf.validate import mmproj_output_width, text_embedding_width

SCHEMA = 1
ROLE_MODEL = "model"
ROLE_MMPROJ = "mmproj"
ROLES = (ROLE_MODEL, ROLE_MMPROJ)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

#: llama.cpp's ``llama_ftype`` (``general.file_type``) values and their usual names.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}


class StoreInputError(StoreError):
    """A store command was given something it cannot use (bad name, ambiguous folder...)."""

    exit_code = 2


def now_iso() -> str:
    """The current UTC time, to the second, ISO 8601."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def check_name(name: str) -> str:
    """Normalise a model name (lower case) and refuse ones that cannot name a file.

    Raises:
        StoreError: saying which characters are allowed.
    """
    norm = name.strip().lower()
    if not _NAME_RE.match(norm) or norm in {".", ".."}:
        raise StoreInputError(
            f"invalid model name {name!r}: use 1-80 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return norm


def slug(text: str) -> str:
    """A model name made from free text (``SmolVLM 256M Instruct`` → ``smolvlm-256m-instruct``)."""
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return s[:80] or "model"


@dataclass
class FileEntry:
    """One file of a model.

    Attributes:
        role: ``model`` or ``mmproj``.
        sha256: Hex digest of the content.
        size: Bytes.
        filename: The file's name where it came from (shown, never used as a path).
        path: Absolute path when the file is referenced in place (``--link`` across
            filesystems); None when it lives in the store's blobs.
    """

    role: str
    sha256: str
    size: int
    filename: str
    path: str | None = None


@dataclass
class ModelFacts:
    """What the GGUF headers say about a pair (zero / empty where a file does not say)."""

    architecture: str = ""
    parameters: int = 0
    vision_parameters: int = 0
    embedding_width: int = 0
    context_length: int = 0
    quantization: str = ""
    mmproj_quantization: str = ""
    projector_type: str = ""
    image_size: int = 0
    preproc_image_size: int = 0
    patch_size: int = 0
    image_tokens: int = 0
    has_chat_template: bool = False
    n_layer: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    head_dim_k: int = 0
    head_dim_v: int = 0
    n_vocab: int = 0
    n_ff: int = 0
    vision_width: int = 0
    vision_ff: int = 0
    vision_layers: int = 0
    vision_heads: int = 0
    general_name: str = ""
    license: str = ""
    sliding_window: int = 0
    """Attention window of the sliding-window layers (Gemma 3), 0: none."""
    swa_layers: int = 0
    """How many layers use that window (the rest attend to the whole context)."""
    matmul_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes of the weight matrices llama.cpp's CPU backend may repack into its own layout,
    by ggml type name: 2-D, not the token embeddings, rows a multiple of 8."""


@dataclass
class Manifest:
    """An installed model.

    Attributes:
        name: Store name (lower case).
        files: The model and the mmproj.
        source: Where it came from: ``{"kind": "import", "from": [...]}`` or
            ``{"kind": "pull", "repo": ..., "revision": ..., "files": [...]}``.
        license: Licence identifier if known.
        facts: From the GGUF headers.
        validated: The child-process load check: ``{"peak_rss": bytes, "seconds": s}``;
            None if it was skipped.
        added: ISO time of installation.
        last_used: ISO time of the last load by name, or None.
    """

    name: str
    files: list[FileEntry]
    source: dict[str, Any]
    license: str | None
    facts: ModelFacts
    validated: dict[str, Any] | None = None
    added: str = field(default_factory=now_iso)
    last_used: str | None = None
    shipped: bool = False

    def file(self, role: str) -> FileEntry:
        """The entry of ``role`` (``model`` or ``mmproj``)."""
        for f in self.files:
            if f.role == role:
                return f
        raise StoreError(
            f"the manifest of '{self.name}' has no {role} file: remove and re-import it")

    @property
    def size(self) -> int:
        """Bytes of both files."""
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``manifests/NAME.json``."""
        d = asdict(self)
        d.pop("shipped")
        return {"schema": SCHEMA, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: Path | str) -> Manifest:
        """Parse a manifest, refusing anything malformed.

        Raises:
            StoreError: naming the file and the problem.
        """
        try:
            if d.get("schema") != SCHEMA:
                raise ValueError(f"unknown schema {d.get('schema')!r}")
            files = [FileEntry(**f) for f in d["files"]]
            if sorted(f.role for f in files) != sorted(ROLES):
                raise ValueError("it must list one model and one mmproj file")
            for f in files:
                if not _SHA_RE.match(f.sha256) or not isinstance(f.size, int):
                    raise ValueError(f"bad sha256 or size for the {f.role} file")
            known = {fl.name for fl in fields(ModelFacts)}
            facts = ModelFacts(**{k: v for k, v in d.get("facts", {}).items() if k in known})
            return cls(
                name=check_name(d["name"]),
                files=files,
                source=dict(d.get("source") or {}),
                license=d.get("license"),
                facts=facts,
                validated=d.get("validated"),
                added=str(d.get("added") or ""),
                last_used=d.get("last_used"),
            )
        except (KeyError, TypeError, ValueError, StoreError) as err:
            raise StoreError(
                f"model manifest {where} is damaged ({err}); remove it with "
                "`edge-vlm models rm NAME` or delete the file"
            ) from None


def _int(info: GGUFInfo, key: str) -> int:
    value = info.metadata.get(key)
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return max(int(v) for v in value)  # per-layer arrays (e.g. head_count_kv)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


#: Architectures whose sliding-window layers llama.cpp places by a fixed pattern when the
#: file does not give ``{arch}.attention.sliding_window_pattern``: every n-th layer is a
#: full-attention one (``llama_model::load_swa_pattern``'s default per architecture).
_SWA_PATTERN = {"gemma3": 6, "gemma2": 2, "cohere2": 4}


def _swa_layers(model: GGUFInfo, arch: str, n_layer: int) -> int:
    """Layers that use the sliding window, as llama.cpp decides (0 when unknown: the
    estimate then counts every layer's cache at the full context, erring high)."""
    if not _int(model, f"{arch}.attention.sliding_window"):
        return 0
    given = model.metadata.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(given, list) and all(isinstance(v, bool) for v in given):
        return sum(1 for v in given[:n_layer] if v)
    pattern = (given if isinstance(given, int) and not isinstance(given, bool)
               else _SWA_PATTERN.get(arch, 0))
    if pattern <= 1:
        return 0
    return sum(1 for il in range(n_layer) if il % pattern < pattern - 1)


def _matmul_bytes(info: GGUFInfo) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in info.tensors.values():
        if (len(t.shape) == 2 and t.name != "token_embd.weight" and t.shape[1] % 8 == 0
                and t.ggml_type not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16)):
            out[t.ggml_type.name] = out.get(t.ggml_type.name, 0) + t.nbytes
    return out


def _n_elements(info: GGUFInfo) -> int:
    total = 0
    for t in info.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        total += n
    return total


def quantization(info: GGUFInfo) -> str:
    """The file's quantization: ``general.file_type``, else the type holding most bytes."""
    ftype = info.get_int("general.file_type")
    if ftype is not None and ftype in FILE_TYPES:
        return FILE_TYPES[ftype]
    by_type: dict[GGMLType, int] = {}
    for t in info.tensors.values():
        if len(t.shape) >= 2:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.nbytes
    return max(by_type, key=lambda k: by_type[k]).name if by_type else ""


def tokens_per_image(proj: GGUFInfo) -> int:
    """Image tokens of one encoder pass at the mmproj's image size (one tile for tilers)."""
    image = _int(proj, "clip.vision.image_size")
    patch = _int(proj, "clip.vision.patch_size")
    if not image or not patch:
        return 0
    n = (image // patch) ** 2
    ptype = proj.get_str("clip.projector_type") or ""
    scale = _int(proj, "clip.vision.projector.scale_factor")
    if scale > 1:
        n //= scale * scale
    elif ptype.startswith(("qwen2vl", "qwen25vl", "qwen3vl")):
        n //= 4  # 2x2 patch merge
    elif ptype in {"ldp", "ldpv2"}:
        n //= 4
    return n


def facts_from(model: GGUFInfo, proj: GGUFInfo) -> ModelFacts:
    """Read the facts of a pair from its two parsed headers."""
    arch = model.architecture or ""
    n_embd = text_embedding_width(model) or 0
    n_head = _int(model, f"{arch}.attention.head_count")
    head_k = _int(model, f"{arch}.attention.key_length") or (n_embd // n_head if n_head else 0)
    head_v = _int(model, f"{arch}.attention.value_length") or head_k
    tokens = model.metadata.get("tokenizer.ggml.tokens")
    n_vocab = tokens.length if isinstance(tokens, ArraySummary) else (
        len(tokens) if isinstance(tokens, list) else 0)
    licence = model.get_str("general.license") or ""
    return ModelFacts(
        architecture=arch,
        parameters=_n_elements(model),
        vision_parameters=_n_elements(proj),
        embedding_width=n_embd or (mmproj_output_width(proj) or 0),
        context_length=_int(model, f"{arch}.context_length"),
        quantization=quantization(model),
        mmproj_quantization=quantization(proj),
        projector_type=proj.get_str("clip.projector_type")
        or proj.get_str("clip.vision.projector_type") or "",
        image_size=_int(proj, "clip.vision.image_size"),
        preproc_image_size=_int(proj, "clip.vision.preproc_image_size"),
        patch_size=_int(proj, "clip.vision.patch_size"),
        image_tokens=tokens_per_image(proj),
        has_chat_template="tokenizer.chat_template" in model.metadata,
        n_layer=_int(model, f"{arch}.block_count"),
        n_head=n_head,
        n_head_kv=_int(model, f"{arch}.attention.head_count_kv") or n_head,
        head_dim_k=head_k,
        head_dim_v=head_v,
        n_vocab=n_vocab,
        n_ff=_int(model, f"{arch}.feed_forward_length"),
        vision_width=_int(proj, "clip.vision.embedding_length"),
        vision_ff=_int(proj, "clip.vision.feed_forward_length"),
        vision_layers=_int(proj, "clip.vision.block_count"),
        vision_heads=_int(proj, "clip.vision.attention.head_count"),
        general_name=model.get_str("general.name") or "",
        license=licence,
        sliding_window=_int(model, f"{arch}.attention.sliding_window"),
        swa_layers=_swa_layers(model, arch, _int(model, f"{arch}.block_count")),
        matmul_bytes=_matmul_bytes(model),
    )


def human_size(n: float) -> str:
    """``1.2 GB``-style size (decimal units, as the hub and file managers show)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    """``135M``-style parameter count."""
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}K"
    return str(n)

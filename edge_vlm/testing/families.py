"""The vision-language families edge-vlm is checked against: shapes, keys, tokens, template.

Each family is data: a :class:`~edge_vlm.testing.specs.TextSpec`, a
:class:`~edge_vlm.testing.specs.VisionSpec`, its special tokens and chat template. ``tiny``
shapes make a pair in seconds for tests; the full-size presets copy a real checkpoint's
shapes for benchmarks (random weights either way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from edge_vlm.gguf.constants import TokenType
from edge_vlm.testing import templates
from edge_vlm.testing.specs import TextSpec, VisionSpec

C, U = TokenType.CONTROL, TokenType.USER_DEFINED


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: What users call it (``qwen2.5-vl``).
        text: Language-model shapes.
        vision: Vision-encoder and projector shapes.
        chat_template: ``tokenizer.chat_template``.
        special_tokens: Tokens that must be single tokens (chat and image markers), with type.
        bos: BOS token text (``<s>`` and ``</s>`` always exist).
        eos: EOS token text.
        eot: End-of-turn token text, if the family has one besides EOS.
        add_bos: ``tokenizer.ggml.add_bos_token``.
        dynamic: The projector sizes images by a token budget (``image_min_tokens`` /
            ``image_max_tokens``) rather than fixed tiles.
        note: One line for ``--list`` and the README.
    """

    name: str
    text: TextSpec
    vision: VisionSpec
    chat_template: str
    special_tokens: Mapping[str, TokenType] = field(default_factory=dict)
    bos: str = "<s>"
    eos: str = "</s>"
    eot: str | None = None
    add_bos: bool = True
    dynamic: bool = False
    note: str = ""

    @property
    def projector(self) -> str:
        """libmtmd projector type."""
        return self.vision.projector


def _text(arch: str, **kw: object) -> TextSpec:
    base: dict[str, object] = {"n_embd": 256, "n_layer": 2, "n_head": 4, "n_head_kv": 2,
                               "n_ff": 512, "n_ctx": 4096}
    return TextSpec(arch=arch, **(base | kw))  # type: ignore[arg-type]


def _vision(projector: str, **kw: object) -> VisionSpec:
    base: dict[str, object] = {"n_embd": 64, "n_ff": 128, "n_layer": 2, "n_head": 4,
                               "n_embd_text": 256}
    return VisionSpec(projector=projector, **(base | kw))  # type: ignore[arg-type]


_QWEN_TOKENS = {t: C for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                               "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                               "<|image_pad|>", "<|video_pad|>")}
_SMOLVLM_TOKENS: dict[str, TokenType] = {
    "<|endoftext|>": C, "<|im_start|>": C, "<|im_end|>": C,
    "<end_of_utterance>": U, "<fake_token_around_image>": U, "<image>": U, "<global-img>": U,
    **{f"<row_{r}_col_{c}>": U for r in range(1, 7) for c in range(1, 7)},
}
_LFM2_TOKENS: dict[str, TokenType] = {
    "<|pad|>": C, "<|startoftext|>": C, "<|endoftext|>": C, "<|im_start|>": C, "<|im_end|>": C,
    "<image>": C, "<|image_start|>": C, "<|image_end|>": C, "<|img_thumbnail|>": C,
    **{f"<|img_row_{r}_col_{c}|>": C for r in range(1, 11) for c in range(1, 11)},
}

#: The tiny pairs, by family name.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        "generic", _text("llama", n_ctx=1024),
        _vision("mlp", image_size=64, patch_size=16, eps=1e-5),
        templates.GENERIC,
        {t: C for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")},
        eot="<|end|>",
        note="edge-vlm's own test model: llama + LLaVA-style mlp, <|role|> template",
    ),
    Family(
        "llava", _text("llama"),
        _vision("mlp", image_size=64, patch_size=16, eps=1e-5),
        templates.LLAVA, {"<image>": U},
        note="LLaVA-1.5: CLIP ViT + mlp projector, fixed size, USER:/ASSISTANT: template",
    ),
    Family(
        "smolvlm", _text("llama"),
        _vision("idefics3", image_size=64, patch_size=8, merge=2, preproc_image_size=256),
        templates.SMOLVLM, _SMOLVLM_TOKENS, bos="<|im_start|>", eos="<end_of_utterance>",
        add_bos=False,
        note="SmolVLM (Idefics3): SigLIP tiles + overview, pixel shuffle",
    ),
    Family(
        "qwen2.5-vl", _text("qwen2vl", head_dim=0, rope_sections=(8, 12, 12, 0),
                            rope_theta=1000000.0),
        _vision("qwen2.5vl_merger", image_size=224, patch_size=14, merge=2,
                extra={"n_wa_pattern": 2}),
        templates.QWEN25_VL, _QWEN_TOKENS, bos="<|endoftext|>", eos="<|im_end|>",
        add_bos=False, dynamic=True,
        note="Qwen2.5-VL: M-RoPE, dynamic resolution, window attention in the ViT",
    ),
    Family(
        "qwen3-vl", _text("qwen3vl", rope_sections=(12, 10, 10, 0), rope_theta=5000000.0),
        _vision("qwen3vl_merger", image_size=64, patch_size=16, merge=2),
        templates.QWEN3_VL, _QWEN_TOKENS, bos="<|endoftext|>", eos="<|im_end|>",
        add_bos=False, dynamic=True,
        note="Qwen3-VL: M-RoPE, dynamic resolution (no DeepStack layers in the tiny pair)",
    ),
    Family(
        "gemma-3", _text("gemma3", sliding_window=512),
        _vision("gemma3", image_size=64, patch_size=8, merge=2),
        templates.GEMMA3,
        {t: C for t in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>",
                        "<start_of_image>", "<end_of_image>", "<image_soft_token>")},
        bos="<bos>", eos="<eos>", eot="<end_of_turn>",
        note="Gemma 3: SigLIP + pooling, fixed size, image tokens attend non-causally",
    ),
    Family(
        "internvl", _text("qwen2"),
        _vision("internvl", image_size=64, patch_size=8, merge=2, max_tiles=4),
        templates.INTERNVL,
        {**_QWEN_TOKENS, "<img>": C, "</img>": C, "<IMG_CONTEXT>": C},
        bos="<|endoftext|>", eos="<|im_end|>", add_bos=False,
        note="InternVL 3: InternViT tiles + thumbnail, Qwen2 text",
    ),
    Family(
        "lfm2-vl", _text("lfm2", conv_layers=(0,), rms_eps=1e-5),
        _vision("lfm2", image_size=256, patch_size=16, merge=2),
        templates.LFM2_VL, _LFM2_TOKENS, bos="<|startoftext|>", eos="<|im_end|>",
        note="LFM2-VL: SigLIP2 + pixel unshuffle; hybrid text model (short convolutions)",
    ),
    Family(
        "moondream", _text("phi2", rms_eps=1e-5, head_dim=64),
        _vision("mlp", image_size=64, patch_size=16, eps=1e-6),
        templates.MOONDREAM, {"<|endoftext|>": C}, bos="<|endoftext|>", eos="<|endoftext|>",
        add_bos=False,
        note="moondream2: SigLIP + mlp projector, Phi-2 text (LayerNorm, parallel blocks)",
    ),
    Family(
        "pixtral", _text("llama", rope_theta=1000000000.0, rms_eps=1e-5),
        _vision("pixtral", image_size=512, patch_size=16, eps=1e-5),
        templates.PIXTRAL,
        {t: C for t in ("[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
                        "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")},
        dynamic=True,
        note="Pixtral: 2D-RoPE ViT, dynamic resolution, [IMG_BREAK] per row",
    ),
)}


def _full(name: str, text: dict[str, object], vision: dict[str, object],
          n_vocab: int) -> tuple[Family, int]:
    fam = FAMILIES[name]
    t = dataclasses.replace(fam.text, tied_output=True, **text)  # type: ignore[arg-type]
    v = dataclasses.replace(fam.vision, n_embd_text=t.n_embd, **vision)  # type: ignore[arg-type]
    return dataclasses.replace(fam, text=t, vision=v), n_vocab


_SIGLIP_B = {"n_embd": 768, "n_ff": 3072, "n_layer": 12, "n_head": 12}
_SIGLIP_SO400M = {"n_embd": 1152, "n_ff": 4304, "n_layer": 27, "n_head": 16}

#: Full-size shape-alikes for benchmarks: name -> (family with real shapes, vocabulary size).
FULL_SIZE: dict[str, tuple[Family, int]] = {
    "smolvlm-256m": _full(
        "smolvlm",
        {"n_embd": 576, "n_layer": 30, "n_head": 9, "n_head_kv": 3, "n_ff": 1536,
         "n_ctx": 8192, "rms_eps": 1e-5, "rope_theta": 100000.0},
        {**_SIGLIP_B, "image_size": 512, "patch_size": 16, "merge": 4,
         "preproc_image_size": 2048}, 49152),
    "smolvlm-500m": _full(
        "smolvlm",
        {"n_embd": 960, "n_layer": 32, "n_head": 15, "n_head_kv": 5, "n_ff": 2560,
         "n_ctx": 8192, "rms_eps": 1e-5, "rope_theta": 100000.0},
        {**_SIGLIP_B, "image_size": 512, "patch_size": 16, "merge": 4,
         "preproc_image_size": 2048}, 49152),
    # For developing the benchmark suite: SmolVLM's tiling and token layout, tiny towers.
    "tiny-idefics3": _full(
        "smolvlm",
        {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_head_kv": 2, "n_ff": 256,
         "n_ctx": 8192, "rms_eps": 1e-5},
        {"n_embd": 64, "n_ff": 128, "n_layer": 1, "n_head": 4, "image_size": 512,
         "patch_size": 16, "merge": 4, "preproc_image_size": 2048}, 4096),
    "qwen2.5-vl-3b": _full(
        "qwen2.5-vl",
        {"n_embd": 2048, "n_layer": 36, "n_head": 16, "n_head_kv": 2, "n_ff": 11008,
         "n_ctx": 128000, "rope_sections": (16, 24, 24, 0)},
        {"n_embd": 1280, "n_ff": 3420, "n_layer": 32, "n_head": 16, "image_size": 560,
         "patch_size": 14, "extra": {"n_wa_pattern": 8}}, 151936),
    "gemma-3-4b": _full(
        "gemma-3",
        {"n_embd": 2560, "n_layer": 34, "n_head": 8, "n_head_kv": 4, "n_ff": 10240,
         "head_dim": 256, "n_ctx": 131072, "sliding_window": 1024},
        {**_SIGLIP_SO400M, "image_size": 896, "patch_size": 14, "merge": 4}, 262144),
}


def family(name: str) -> Family:
    """The tiny family called ``name``.

    Raises:
        KeyError: Unknown name (the message lists the known ones).
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None

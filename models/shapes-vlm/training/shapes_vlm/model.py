"""The PyTorch model of ``shapes-vlm``, written to compute exactly what llama.cpp computes.

* Vision (clip.cpp ``mlp`` projector graph, ``tools/mtmd/models/llava.cpp``): a 16x16
  patch convolution with bias, patches in row-major order, learned position embeddings,
  no class embedding, no pre-LN; pre-LN blocks (LayerNorm with bias, attention with biases,
  MLP ``up → gelu_quick → down`` with biases, since ``clip.use_gelu`` is false); every block
  runs (``clip.vision.feature_layer = n_layer``), then ``post_ln``; projector
  ``mm.0 → GELU (tanh) → mm.2``.
* Text (llama.cpp ``llama`` architecture): RMSNorm, RoPE of type NORM (rotating *adjacent*
  pairs of each head), causal attention scaled by ``1/sqrt(head_dim)``, SwiGLU, final
  RMSNorm, output tied to the token embedding.
* Image preprocessing: see :func:`shapes_vlm.data.letterbox` (Pillow-style bicubic
  resize to fit, centred on a (122, 116, 104) canvas, ``(x/255 - 0.5)/0.5``).

The auxiliary heads (:class:`VisionHeads`) train the encoder with dense labels; they are not
exported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    """Hyper-parameters of the whole model."""

    image_size: int = 112
    patch_size: int = 16
    v_embd: int = 192
    v_ff: int = 768
    v_layer: int = 4
    v_head: int = 4
    v_eps: float = 1e-5
    n_vocab: int = 0
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_ff: int = 512
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def gelu_quick(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``gelu_quick``: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


class VisionBlock(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        e = c.v_embd
        self.n_head = c.v_head
        self.ln1 = nn.LayerNorm(e, eps=c.v_eps)
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))
        self.ln2 = nn.LayerNorm(e, eps=c.v_eps)
        self.up = nn.Linear(e, c.v_ff)
        self.down = nn.Linear(c.v_ff, e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, e = x.shape
        h = self.ln1(x)
        q, k, v = (
            m(h).view(b, n, self.n_head, -1).transpose(1, 2) for m in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, e))
        return x + self.down(gelu_quick(self.up(self.ln2(x))))


class VisionEncoder(nn.Module):
    """ViT + post-LN; returns ``[B, n_patches, v_embd]`` features."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, c.v_embd, c.patch_size, stride=c.patch_size, bias=True)
        self.pos = nn.Parameter(torch.randn(c.n_patches, c.v_embd) * 0.02)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.v_layer))
        self.post_ln = nn.LayerNorm(c.v_embd, eps=c.v_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos  # row-major patches
        for blk in self.blocks:
            x = blk(x)
        return self.post_ln(x)


class Projector(nn.Module):
    """``mm.0`` → GELU (tanh approximation, ggml_gelu) → ``mm.2``."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.mm0 = nn.Linear(c.v_embd, c.n_embd)
        self.mm2 = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm2(F.gelu(self.mm0(x), approximate="tanh"))


N_SHAPE_CLS = 7  # background, letterbox pad, 5 shapes
N_COLOR, N_POS, N_RANK, N_COUNT, N_BG, N_KIND = 8, 5, 3, 3, 8, 5


class VisionHeads(nn.Module):
    """Dense supervised heads used only to pre-train the encoder (never exported)."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        e = c.v_embd
        self.shape = nn.Linear(e, N_SHAPE_CLS)
        self.color = nn.Linear(e, N_COLOR)
        self.pos = nn.Linear(e, N_POS)
        self.rank = nn.Linear(e, N_RANK)
        self.count = nn.Linear(e, N_COUNT)
        self.bg = nn.Linear(e, N_BG)
        self.present = nn.Linear(e, N_KIND)

    def forward(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        g = f.mean(1)
        return {
            "shape": self.shape(f),
            "color": self.color(f),
            "pos": self.pos(f),
            "rank": self.rank(f),
            "count": self.count(g),
            "bg": self.bg(g),
            "present": self.present(g),
        }


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(n_pos: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE type NORM: rotate adjacent pairs (2i, 2i+1). ``x``: [B, H, T, D]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    r0 = x0 * cos - x1 * sin
    r1 = x0 * sin + x1 * cos
    return torch.stack((r0, r1), dim=-1).flatten(-2)


class TextBlock(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        e = c.n_embd
        self.n_head = c.n_head
        self.attn_norm = RMSNorm(e, c.rms_eps)
        self.q, self.k, self.v, self.o = (nn.Linear(e, e, bias=False) for _ in range(4))
        self.ffn_norm = RMSNorm(e, c.rms_eps)
        self.gate = nn.Linear(e, c.n_ff, bias=False)
        self.up = nn.Linear(e, c.n_ff, bias=False)
        self.down = nn.Linear(c.n_ff, e, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        h = self.attn_norm(x)
        q, k, v = (
            m(h).view(b, t, self.n_head, -1).transpose(1, 2) for m in (self.q, self.k, self.v)
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, e))
        h = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TextModel(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.n_vocab, c.n_embd)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(TextBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd, c.rms_eps)
        cos, sin = rope_tables(1024, c.n_embd // c.n_head, c.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, h: torch.Tensor, keep: tuple[int, ...] = ()) -> torch.Tensor:
        """``h``: input embeddings [B, T, E] → logits [B, T, V] (tied output).

        ``keep``: also store the inputs of these blocks in ``self.kept`` (training only).
        """
        t = h.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        self.kept: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks):
            if i in keep:
                self.kept[i] = h
            h = blk(h, cos, sin)
        return self.norm(h) @ self.embed.weight.T

    def head_attention(
        self, layer: int, head: int, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """Attention probabilities of one head of block ``layer`` (input from ``self.kept``)
        at query positions ``cols`` of sequences ``rows``: ``[N, T]``. Training only."""
        blk = self.blocks[layer]
        x = blk.attn_norm(self.kept[layer])
        t, d = x.shape[1], self.c.n_embd // self.c.n_head
        sl = slice(head * d, (head + 1) * d)
        q = F.linear(x[rows, cols], blk.q.weight[sl])  # [N, d]
        k = F.linear(x[rows], blk.k.weight[sl])  # [N, T, d]
        q = apply_rope(
            q[:, None, None, :], self.cos[cols][:, None, None], self.sin[cols][:, None, None]
        )
        k = apply_rope(k[:, None], self.cos[:t], self.sin[:t])
        logits = (q @ k.transpose(-1, -2))[:, 0, 0] / math.sqrt(d)  # [N, T]
        future = torch.arange(t, device=x.device)[None, :] > cols[:, None]
        return logits.float().masked_fill(future, float("-inf")).softmax(-1)


class ShapesVLM(nn.Module):
    """Vision encoder + projector + text model (+ training-only heads)."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        self.vision = VisionEncoder(c)
        self.heads = VisionHeads(c)
        self.proj = Projector(c)
        self.text = TextModel(c)

    def embed(
        self, tokens: torch.Tensor, img_feats: torch.Tensor, img_pos: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings with the projected image features placed at their positions.

        Args:
            tokens: [B, T] token ids (anything at image positions).
            img_feats: [B, n_patches, v_embd] encoder output.
            img_pos: [B] index of the first image position in each sequence.
        """
        h = self.text.embed(tokens)
        proj = self.proj(img_feats)
        n = proj.shape[1]
        idx = img_pos[:, None] + torch.arange(n, device=tokens.device)[None, :]
        return h.scatter(1, idx[..., None].expand(-1, -1, h.shape[2]), proj.to(h.dtype))

    def forward(
        self,
        tokens: torch.Tensor,
        img_feats: torch.Tensor,
        img_pos: torch.Tensor,
        keep: tuple[int, ...] = (),
    ) -> torch.Tensor:
        return self.text(self.embed(tokens, img_feats, img_pos), keep)


def init_weights(m: nn.Module) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    for name, p in m.named_parameters():
        if name.endswith(("o.weight", "down.weight")):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * 4))


def load_resampled(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``, resampling a patch embedding of another patch size.

    A ``k``-times larger patch over a ``k``-times larger image covers the same part of the
    picture: each weight of the small kernel is spread over a ``k``x``k`` block (divided by
    ``k**2``), so the encoder computes what it computed before on the image downscaled by
    ``k`` (area average). A model trained at 112 px then starts at 224 px where it stood.
    """
    state = dict(state)
    key = "vision.patch.weight"
    want = model.state_dict()[key].shape
    have = state[key].shape
    if want != have:
        k = want[-1] // have[-1]
        if want[:2] != have[:2] or k * have[-1] != want[-1]:
            raise ValueError(f"cannot resample a {tuple(have)} patch embedding to {tuple(want)}")
        w = state[key].repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
        state[key] = w / (k * k)
    model.load_state_dict(state)


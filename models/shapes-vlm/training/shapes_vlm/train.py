"""Train ``shapes-vlm`` on the CPU: ``python -m shapes_vlm.train --out checkpoints/``.

Recipe (each phase resumes from ``<out>/last.pt``; every batch is a pure function of the
seed and the step, so a resumed run continues exactly as an uninterrupted one):

1. ``bank``: render ``--bank`` letterboxed scenes once with Pillow (cached in
   ``<out>/bank-<seed>-<n>.npz``), with dense per-patch labels.
2. ``vision``: pre-train the ViT with cheap supervised heads (per patch: shape / colour /
   position / left-to-right rank of the object covering it; per image: count, background,
   which shapes are present). The heads are never exported.
3. ``lm``: freeze the ViT, cache its features for the whole bank, train projector + language
   model on multi-turn conversations (1-4 turns, sometimes a system message), loss on the
   assistant answers and their ``<|end|>`` only.
4. ``joint``: optional short fine-tune of everything at a low learning rate.
5. ``tune``: the lm phase again, weighted toward the questions that name a shape ("Is there
   a star?", "What color is the star?", "Where is the star?"), with ``--attn-sup``: two
   attention heads are told where to look (see
   :func:`shapes_vlm.lmdata.lookup_attention_loss`). The lm phase alone leaves those
   questions at chance.

``--init`` starts a run from another checkpoint's weights, also at another resolution: a
model trained at 112 px with 16-px patches continues at 224 px with 32-px patches (same 49
image tokens, so the language model is unchanged) exactly where it stood, and then learns
from the finer pixels (see :func:`shapes_vlm.model.load_resampled`).

The shipped model: ``--vision-steps 6000 --lm-steps 3000 --joint-steps 0`` (run2), then
``--tune-steps 1500 --tune-lr 1e-3`` resumed from its lm checkpoint, then two rounds at 224
px (``--init``, vision + tune, the second on a fresh bank); the model card has the commands.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shapes_vlm import data, vocab
from shapes_vlm.lmdata import lm_batch, lookup_attention_loss
from shapes_vlm.model import Config, ShapesVLM, init_weights, load_resampled

PHASES = ("vision", "lm", "joint", "tune")
# ``tune``: the lm phase again (frozen ViT), weighted toward the questions that look a named
# shape up, with the lookup attention supervision (see lookup_attention_loss).
TUNE_WEIGHTS = {
    "shape": 1.0,
    "shapes": 1.5,
    "color": 3.0,
    "count": 1.0,
    "where": 3.0,
    "is_there": 2.0,
    "describe": 2.5,
}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def load_bank(out: Path, n: int, seed: int, c: Config) -> data.Bank:
    import pickle

    path = out / f"bank-{seed}-{n}-{c.image_size}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            return pickle.load(f)
    t = time.time()
    bank = data.make_bank(n, seed, c.image_size, c.patch_size, workers=2)
    with open(path, "wb") as f:
        pickle.dump(bank, f, protocol=pickle.HIGHEST_PROTOCOL)
    print(f"bank: {n} images rendered in {time.time() - t:.0f} s", flush=True)
    return bank


def to_pixels(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float().div_(255.0)
    return x.sub_(0.5).div_(0.5).permute(0, 3, 1, 2).contiguous()


def augment(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
    """Cheap photometric jitter of uint8 images (labels unchanged)."""
    x = images.astype(np.float32)
    b = len(x)
    gain = rng.uniform(0.9, 1.1, (b, 1, 1, 1)).astype(np.float32)
    bias = rng.uniform(-10, 10, (b, 1, 1, 1)).astype(np.float32)
    x = x * gain + bias
    noisy = rng.random(b) < 0.3
    if noisy.any():
        x[noisy] += rng.normal(0, 6, x[noisy].shape).astype(np.float32)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Phase: vision


def vision_loss(
    model: ShapesVLM, feats: torch.Tensor, lab: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict]:
    out = model.heads(feats)
    losses = {
        # Shape identity is the slowest thing to learn (colour and position come first).
        "shape": 2.0 * F.cross_entropy(out["shape"].flatten(0, 1), lab["shape"].flatten()),
        # ... and background patches dominate: also score the kind on object patches alone.
        "kind": 2.0
        * F.cross_entropy(out["shape"][lab["shape"] >= 2], lab["shape"][lab["shape"] >= 2]),
        "color": F.cross_entropy(
            out["color"].flatten(0, 1), lab["color"].flatten(), ignore_index=-100
        ),
        "pos": F.cross_entropy(out["pos"].flatten(0, 1), lab["pos"].flatten(), ignore_index=-100),
        "rank": F.cross_entropy(
            out["rank"].flatten(0, 1), lab["rank"].flatten(), ignore_index=-100
        ),
        "count": F.cross_entropy(out["count"], lab["count"]),
        "bg": F.cross_entropy(out["bg"], lab["bg"]),
        "present": 3.0 * F.binary_cross_entropy_with_logits(out["present"], lab["present"]),
    }
    with torch.no_grad():
        m = lab["shape"] >= 2
        acc = {
            "shape": (out["shape"].argmax(-1)[m] == lab["shape"][m]).float().mean().item(),
            "color": (out["color"].argmax(-1)[m] == lab["color"][m]).float().mean().item(),
            "pos": (out["pos"].argmax(-1)[m] == lab["pos"][m]).float().mean().item(),
            "count": (out["count"].argmax(-1) == lab["count"]).float().mean().item(),
            "bg": (out["bg"].argmax(-1) == lab["bg"]).float().mean().item(),
        }
    return sum(losses.values()), acc


def bank_labels(bank: data.Bank, idx: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v[idx]) for k, v in bank.labels.items()}


# ---------------------------------------------------------------------------------------


def save(
    path: Path,
    model: ShapesVLM,
    opt: torch.optim.Optimizer | None,
    phase: str,
    step: int,
    args: argparse.Namespace,
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "config": model.c.to_dict(),
            "model": model.state_dict(),
            "opt": opt.state_dict() if opt else None,
            "phase": phase,
            "step": step,
            "args": vars(args),
        },
        tmp,
    )
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bank", type=int, default=40000)
    p.add_argument("--vision-steps", type=int, default=1500)
    p.add_argument("--vision-batch", type=int, default=64)
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--lm-steps", type=int, default=3000)
    p.add_argument("--lm-batch", type=int, default=48)
    p.add_argument("--lm-lr", type=float, default=2e-3)
    p.add_argument(
        "--lm-images",
        type=int,
        default=0,
        help="use only the first N bank images in the lm phase (0: all); their "
        "frozen vision features are cached",
    )
    p.add_argument("--joint-steps", type=int, default=0)
    p.add_argument("--joint-batch", type=int, default=32)
    p.add_argument("--joint-lr", type=float, default=2e-4)
    p.add_argument("--joint-aux", type=float, default=0.3, help="weight of the dense vision losses")
    p.add_argument(
        "--curriculum",
        type=float,
        default=0.4,
        help="fraction of the vision phase that favours scenes of large shapes (annealed)",
    )
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast for the forward passes (fp32 master weights and losses)",
    )
    p.add_argument(
        "--attn-sup",
        type=float,
        default=1.0,
        help="weight of the loss that teaches one text head to find the shape a question "
        "names (0: off)",
    )
    p.add_argument(
        "--attn-layer", type=int, default=1, help="block of the second hop (the first: one below)"
    )
    p.add_argument("--tune-steps", type=int, default=0)
    p.add_argument("--tune-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument(
        "--init",
        type=Path,
        help="start the vision phase from this checkpoint's weights (all of them; a patch "
        "embedding of a smaller patch size is resampled, see model.load_resampled)",
    )
    p.add_argument(
        "--small-weight",
        type=float,
        default=0.0,
        help="after the curriculum, draw scenes with weight exp(-K * smallest shape size) "
        "(K > 0 shows scenes with small shapes more often)",
    )
    p.add_argument("--v-layer", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=3)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    c = Config(
        n_vocab=len(vocab.shapes_vocab()),
        v_layer=args.v_layer,
        n_layer=args.n_layer,
        image_size=args.image_size,
        patch_size=args.patch_size,
    )
    torch.manual_seed(args.seed)
    model = ShapesVLM(c)
    init_weights(model)
    last = args.out / "last.pt"
    phase, step = "vision", 0
    ck = None
    if last.exists():
        ck = torch.load(last, weights_only=False)
        model.load_state_dict(ck["model"])
        phase, step = ck["phase"], ck["step"]
        print(f"resumed {phase} at step {step}", flush=True)
    elif args.init:
        load_resampled(model, torch.load(args.init, weights_only=False)["model"])
        print(f"initialised from {args.init}", flush=True)
    bank = load_bank(args.out, args.bank, args.seed, c)
    N = len(bank.scenes)
    n_img = c.n_patches
    # The smallest shape of each scene: the vision curriculum shows big shapes first (a ViT
    # learns shape identity on large objects much sooner, then transfers it to small ones).
    min_size = np.array([min(sh.size for sh in sc.shapes) for sc in bank.scenes])
    t0 = time.time()

    for ph in PHASES[PHASES.index(phase) :]:
        total = {
            "vision": args.vision_steps,
            "lm": args.lm_steps,
            "joint": args.joint_steps,
            "tune": args.tune_steps,
        }[ph]
        if ph != phase:
            step = 0
            ck = None
        if step >= total:
            continue
        if ph == "vision":
            params = list(model.vision.parameters()) + list(model.heads.parameters())
            peak, bs = args.vision_lr, args.vision_batch
        elif ph in ("lm", "tune"):
            params = list(model.proj.parameters()) + list(model.text.parameters())
            peak = args.lm_lr if ph == "lm" else args.tune_lr
            bs = args.lm_batch
        else:
            params = list(model.parameters())
            peak, bs = args.joint_lr, args.joint_batch
        if ph == "joint":
            # Vision (+ its heads, whose dense losses stay on) at half the text model's rate.
            vis = list(model.vision.parameters()) + list(model.heads.parameters())
            rest = list(model.proj.parameters()) + list(model.text.parameters())
            groups = [{"params": vis, "scale": 0.5}, {"params": rest, "scale": 1.0}]
        else:
            groups = [{"params": params, "scale": 1.0}]
        opt = torch.optim.AdamW(groups, lr=peak, weight_decay=0.01, betas=(0.9, 0.98))
        if ck is not None and ck.get("opt") and ck["phase"] == ph:
            opt.load_state_dict(ck["opt"])
        feats_cache = None
        if ph in ("lm", "tune"):
            model.vision.eval()
            t = time.time()
            n_lm = min(N, args.lm_images or N)
            with torch.no_grad():
                chunks = []
                for a in range(0, n_lm, 256):
                    chunks.append(model.vision(to_pixels(bank.images[a : a + 256])).half())
                feats_cache = torch.cat(chunks)
            print(
                f"lm: cached vision features {tuple(feats_cache.shape)} in {time.time() - t:.0f} s",
                flush=True,
            )
        model.train()
        t_phase = time.time()
        log: dict[str, float] = {}
        while step < total:
            lr = lr_at(step, total, peak, warmup=min(100, total // 10 + 1))
            for g in opt.param_groups:
                g["lr"] = lr * g["scale"]
            rs = random.Random(f"{args.seed}-{ph}-{step}")
            nrng = np.random.default_rng([args.seed, PHASES.index(ph), step])
            idx = nrng.integers(0, n_lm if ph in ("lm", "tune") else N, bs)
            warm = args.curriculum * total
            if ph == "vision" and step < warm:
                k = 12.0 * (1 - step / warm)
                w = np.exp(k * min_size)
                idx = nrng.choice(N, bs, p=w / w.sum())
            elif ph == "vision" and args.small_weight:
                w = np.exp(-args.small_weight * min_size)
                idx = nrng.choice(N, bs, p=w / w.sum())
            if ph == "vision":
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                    feats = model.vision(to_pixels(augment(nrng, bank.images[idx]))).float()
                loss, acc = vision_loss(model, feats, bank_labels(bank, idx))
                for k, v in acc.items():
                    log[k] = log.get(k, 0.0) + v
            else:
                batch = lm_batch(rs, bank, idx, n_img, TUNE_WEIGHTS if ph == "tune" else None)
                tok, tgt, starts = batch.tok, batch.tgt, batch.starts
                if ph in ("lm", "tune"):
                    feats = feats_cache[idx].float()  # type: ignore[index]
                else:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                        feats = model.vision(to_pixels(augment(nrng, bank.images[idx]))).float()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                    logits = model(
                        tok, feats, starts, keep=(args.attn_layer - 1, args.attn_layer)
                    ).float()
                    sup = lookup_attention_loss(
                        model, batch, torch.from_numpy(bank.labels["shape"][idx]), args.attn_layer
                    )
                loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
                if args.attn_sup:
                    loss = loss + args.attn_sup * sup
                    log["attn"] = log.get("attn", 0.0) + sup.item()
                if ph == "joint":
                    vloss, acc = vision_loss(model, feats, bank_labels(bank, idx))
                    loss = loss + args.joint_aux * vloss
                    for k_, v_ in acc.items():
                        log[k_] = log.get(k_, 0.0) + v_
                with torch.no_grad():
                    m = tgt != -100
                    log["tok_acc"] = (
                        log.get("tok_acc", 0.0)
                        + (logits.argmax(-1)[m] == tgt[m]).float().mean().item()
                    )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            log["loss"] = log.get("loss", 0.0) + loss.item()
            step += 1
            if step % 50 == 0 or step == total:
                k = 50 if step % 50 == 0 else step % 50
                el = time.time() - t_phase
                print(
                    f"{ph} {step}/{total} lr {lr:.2e} "
                    + " ".join(f"{a} {b / k:.4f}" for a, b in log.items())
                    + f" | {el:.0f}s in phase, {time.time() - t0:.0f}s total",
                    flush=True,
                )
                log = {}
            if step % args.ckpt_every == 0 or step == total:
                save(last, model, opt, ph, step, args)
        save(args.out / f"{ph}.pt", model, None, ph, step, args)
        nxt = PHASES[PHASES.index(ph) + 1] if ph != PHASES[-1] else ph
        save(last, model, None, nxt, 0 if nxt != ph else step, args)
        phase = ph
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

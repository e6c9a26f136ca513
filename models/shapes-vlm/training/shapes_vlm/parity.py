"""PyTorch vs llama.cpp parity for ``shapes-vlm``.

``python -m shapes_vlm.parity --ckpt CKPT --model model-f32.gguf --mmproj mmproj-f32.gguf``

For random scenes (square ``image_size`` images, so both sides see identical pixels, and
larger non-square ones, which also exercise the downscale + letterbox path) it compares:

* the vision embeddings (projector output): llama.cpp via ``mtmd_encode_chunk`` +
  ``mtmd_get_output_embd`` (:meth:`edge_vlm.api.VLM.debug_image_embeddings`);
* the token sequence libmtmd builds for a conversation with the one the trainer builds;
* the logits at the last prompt position (generation prompt added).

It prints the max abs differences (and the logits' magnitude).
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

import edge_vlm
from shapes_vlm import data, render, world
from shapes_vlm.export import load_checkpoint
from shapes_vlm.model import ShapesVLM


def torch_embeddings(model: ShapesVLM, path: str) -> np.ndarray:
    from PIL import Image

    img = data.letterbox(Image.open(path), model.c.image_size)
    x = torch.from_numpy(data.pixels(img))[None]
    with torch.no_grad():
        return model.proj(model.vision(x))[0].numpy()


def torch_last_logits(
    model: ShapesVLM, messages: list[dict], path: str
) -> tuple[np.ndarray, list[int]]:
    ids, _, starts = data.encode_conversation(messages, model.c.n_patches,
                                              add_generation_prompt=True)
    tok = torch.tensor([[max(0, i) for i in ids]])
    from PIL import Image

    img = data.letterbox(Image.open(path), model.c.image_size)
    x = torch.from_numpy(data.pixels(img))[None]
    with torch.no_grad():
        logits = model(tok, model.vision(x), torch.tensor(starts[:1]))
    return logits[0, -1].numpy(), ids


def flat_chunks(chunks: list[tuple[str, list[int] | int]]) -> list[int]:
    out: list[int] = []
    for kind, v in chunks:
        out.extend(v if kind == "text" else [-1] * int(v))  # type: ignore[arg-type]
    return out


def run(
    ckpt: Path, model_path: Path, mmproj_path: Path, n: int = 8, seed: int = 1234
) -> dict[str, float]:
    model = load_checkpoint(ckpt)
    vlm = edge_vlm.load(model=str(model_path), mmproj=str(mmproj_path))
    rng = random.Random(seed)
    emb_diff, logit_diff, logit_mag, seq_ok = 0.0, 0.0, 0.0, True
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            size = (model.c.image_size,) * 2 if i % 2 == 0 else world.sample_size(rng, (0.5, 2.0))
            scene = world.sample_scene(rng, size=size)
            path = str(Path(tmp) / f"p{i}.png")
            render.render(scene).save(path)
            a = torch_embeddings(model, path)
            b = vlm.debug_image_embeddings(path)
            emb_diff = max(emb_diff, float(np.abs(a - b).max()))
            msgs, _ = world.conversation(
                rng,
                scene,
                path,
                turns=rng.randint(1, 3),
                system=rng.choice([None, *world.SYSTEM_PROMPTS]),
                image_first=i % 3 != 2,
            )
            msgs = msgs[:-1]  # ask the last question
            la, ids = torch_last_logits(model, msgs, path)
            ref = flat_chunks(vlm.debug_prompt_chunks(msgs))
            seq_ok &= ref == ids
            lb = vlm.debug_last_logits(msgs)
            logit_diff = max(logit_diff, float(np.abs(la - lb).max()))
            logit_mag = max(logit_mag, float(np.abs(lb).max()))
            print(
                f"{i}: size {scene.width}x{scene.height} emb {np.abs(a - b).max():.2e} "
                f"logits {np.abs(la - lb).max():.2e} (|logits| {np.abs(lb).max():.1f}) "
                f"tokens {'same' if ref == ids else 'DIFFERENT'}"
            )
    vlm.close()
    return {
        "embedding_max_abs_diff": emb_diff,
        "logits_max_abs_diff": logit_diff,
        "logits_max_abs": logit_mag,
        "token_sequences_equal": float(seq_ok),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--mmproj", type=Path, required=True)
    p.add_argument("-n", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = run(args.ckpt, args.model, args.mmproj, args.n)
    for k, v in res.items():
        print(f"{k}: {v:.3g}")


if __name__ == "__main__":
    main()

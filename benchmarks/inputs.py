"""The benchmark's input images, generated (seeded) so every machine measures the same bytes.

- ``square.png``: 512x512 PNG (scenario a; the first image of e; batch images are more of
  the same kind);
- ``square2.png``: another 512x512 PNG (the second image of scenario e);
- ``photo.jpg``: a 4032x3024 (12-megapixel) JPEG, quality 90, photo-like content
  (smooth gradients, shapes and sensor-like noise, so it compresses like a photo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _scene(rng: np.random.Generator, width: int, height: int, noise: float) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.28)
        base[..., c] = 128 + 90 * np.sin(a * xx / width * 3.14 + b * yy / height * 3.14 + ph)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    scale = max(width, height) / 512
    for _ in range(12):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(20, 90) * scale
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        else:
            draw.rectangle([x - r, y - r * 0.6, x + r, y + r * 0.6], fill=color)
    img = img.filter(ImageFilter.GaussianBlur(radius=1.5 * scale))
    if noise:
        arr = np.asarray(img, np.float32)
        arr += rng.normal(0.0, noise, arr.shape).astype(np.float32)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return img


@dataclass(frozen=True)
class BenchInputs:
    """Paths of the generated images."""

    square: Path
    square2: Path
    photo: Path
    batch: list[Path] = field(default_factory=list)


def make_inputs(folder: Path, *, batch_images: int = 0, seed: int = 0) -> BenchInputs:
    """Write the benchmark images into ``folder`` (reused when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    specs = [("square", "square.png", 512, 512, 0.0), ("square2", "square2.png", 512, 512, 0.0),
             ("photo", "photo.jpg", 4032, 3024, 4.0)]
    for i, (key, name, w, h, noise) in enumerate(specs):
        path = folder / name
        if not path.exists():
            img = _scene(np.random.default_rng(seed + i), w, h, noise)
            if name.endswith(".jpg"):
                img.save(path, quality=90)
            else:
                img.save(path)
        out[key] = path
    batch: list[Path] = []
    for i in range(batch_images):
        path = folder / f"batch-{i:03d}.png"
        if not path.exists():
            _scene(np.random.default_rng(seed + 100 + i), 512, 512, 0.0).save(path)
        batch.append(path)
    return BenchInputs(out["square"], out["square2"], out["photo"], batch)

"""Drawing a :class:`~shapes_vlm.world.Scene` with Pillow: backgrounds, anti-aliased
shapes, JPEG re-encoding. Every image is a pure function of its scene (noise included).

Pillow, numpy and the standard library only (no torch).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from shapes_vlm.world import Background, Scene


def polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Corners of a non-circle shape of radius ``r`` centred at ``(cx, cy)``, turned ``angle``."""
    pts: list[tuple[float, float]]
    if kind == "square":
        pts = [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
        k = r / math.sqrt(2) * 1.05
        pts = [(x * k, y * k) for x, y in pts]
    elif kind == "triangle":
        pts = [
            (r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)
        ]
        pts = [(x, y + r * 0.2) for x, y in pts]
    elif kind == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.42
            a = math.radians(-90 + 36 * i)
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif kind == "cross":
        t = r * 0.34
        a = r * 0.95
        pts = [
            (-t, -a),
            (t, -a),
            (t, -t),
            (a, -t),
            (a, t),
            (t, t),
            (t, a),
            (-t, a),
            (-t, t),
            (-a, t),
            (-a, -t),
            (-t, -t),
        ]
    else:
        raise ValueError(kind)
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _background(bg: Background, w: int, h: int) -> Image.Image:
    if bg.kind == "plain":
        return Image.new("RGB", (w, h), bg.rgb)
    if bg.kind == "gradient":
        # A 256-step ramp along the gradient direction, built from a linear gradient image.
        ramp = Image.linear_gradient("L").rotate(
            bg.angle, resample=Image.Resampling.BILINEAR, expand=False
        )
        diag = int(math.hypot(w, h)) + 2
        ramp = ramp.resize((diag, diag), Image.Resampling.BILINEAR)
        left, top = (diag - w) // 2, (diag - h) // 2
        mask = ramp.crop((left, top, left + w, top + h))
        a = Image.new("RGB", (w, h), bg.rgb)
        b = Image.new("RGB", (w, h), bg.rgb2)
        return Image.composite(b, a, mask)
    # noisy: base + (gaussian noise centred on 128) - 128, clipped
    from PIL import ImageChops

    base = Image.new("RGB", (w, h), bg.rgb)
    # Seeded (Pillow's effect_noise is not: the same scene must render to the same pixels).
    level = np.random.default_rng(bg.seed).normal(128.0, bg.noise, (h, w))
    noise = Image.fromarray(np.clip(np.rint(level), 0, 255).astype(np.uint8), "L").convert("RGB")
    return ImageChops.add(base, noise, scale=1.0, offset=-128)


def render(
    scene: Scene, size: tuple[int, int] | None = None, *, supersample: int = 3
) -> Image.Image:
    """Render a scene as an RGB image.

    Args:
        scene: The scene.
        size: Output (width, height); the scene's own size when None. Geometry is relative,
            so any size shows the same scene.
        supersample: Shapes are drawn at this multiple of the size and downsampled, for
            anti-aliased edges.

    Returns:
        The image.
    """
    w, h = size or (scene.width, scene.height)
    img = _background(scene.background, w, h)
    ss = max(1, supersample)
    W, H = w * ss, h * ss
    short = min(W, H)
    layer = Image.new("RGB", (W, H), (0, 0, 0))
    mask = Image.new("L", (W, H), 0)
    dl, dm = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    for s in scene.shapes:
        cx, cy, r = s.x * W, s.y * H, s.size * short / 2
        if s.kind == "circle":
            box = (cx - r, cy - r, cx + r, cy + r)
            dl.ellipse(box, fill=s.rgb)
            dm.ellipse(box, fill=255)
        else:
            pts = polygon(s.kind, cx, cy, r, s.angle)
            dl.polygon(pts, fill=s.rgb)
            dm.polygon(pts, fill=255)
    if ss > 1:
        layer = layer.resize((w, h), Image.Resampling.BOX)
        mask = mask.resize((w, h), Image.Resampling.BOX)
    # The layer is premultiplied by coverage after BOX filtering; un-premultiply by
    # compositing the un-averaged colour: the shapes never overlap much, so the coverage-
    # weighted mean colour divided by coverage is the shape colour at edges.
    return Image.composite(_unpremultiply(layer, mask), img, mask)


def _unpremultiply(layer: Image.Image, mask: Image.Image) -> Image.Image:
    import numpy as np

    lay = np.asarray(layer, dtype=np.float32)
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    out = np.where(m > 0, lay / np.maximum(m, 1e-6), 0)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def to_jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Re-encode an image as JPEG at ``quality`` and decode it again."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")

"""The synthetic world the shipped ``shapes-vlm`` model knows: scenes, questions, answers.

The standard library only (drawing a scene: :mod:`shapes_vlm.render`).

The world
---------
A scene is 1 to 3 filled shapes (:data:`SHAPES`, all of different kinds) in colours from
:data:`COLORS`, on a background that is either a plain named colour
(:data:`BACKGROUND_COLORS`), a linear gradient between two colours, or a plain colour with
mild per-pixel noise. A shape's size (the diameter of its bounding circle before rotation)
is 10-60% of the image's short side; it is rotated by at most 15 degrees; two shapes never
overlap by more than a sliver (their bounding circles may overlap by at most 10% of the
sum of their radii). A shape's colour is always far (RGB distance >= 120) from the
background colour(s), so every shape is visible. Images may have any size and aspect ratio.

Positions
---------
Let ``(x, y)`` be a shape's centre divided by the image's width and height (``0..1``,
``y`` down), ``dx = x - 0.5`` and ``dy = y - 0.5``.

* ``max(|dx|, |dy|) < 1/6``: "in the center";
* otherwise, if ``|dx| >= |dy|``: "on the left" (``dx < 0``) or "on the right";
* otherwise: "at the top" (``dy < 0``) or "at the bottom".

Scenes are sampled so that no shape lies within :data:`POSITION_MARGIN` of a decision
boundary (``max(|dx|,|dy|) = 1/6`` or ``|dx| = |dy|``) and shape centres are at least
:data:`ORDER_MARGIN` of the width apart horizontally: every answer is unambiguous.
"Left to right" orders shapes by the x of their centres.

Questions and canonical answers
-------------------------------
=====================================  ==========================================================
``What shape is in the image?``        (one-shape scenes only) ``A red circle.``
``What shapes are in the image?``      ``A red circle.`` / ``A red circle and a blue square.`` /
                                       ``A red circle, a blue square and a green star.``
                                       (left to right)
``What color is the {shape}?``         ``Red.`` / ``There is no {shape}.``
``How many shapes are there?``         ``One.`` / ``Two.`` / ``Three.``
``Where is the {shape}?``              ``On the left.`` / ``On the right.`` / ``At the top.`` /
                                       ``At the bottom.`` / ``In the center.`` /
                                       ``There is no {shape}.``
``Is there a {shape}?``                ``Yes.`` / ``No.``
``Describe the image.`` and            see below
``Describe this image in one sentence.``
=====================================  ==========================================================

The article is "an" before a word starting with a vowel ("An orange star.").

The "Describe" grammar::

    description := capitalise(objects ", on " background_phrase ".")
    objects     := obj                         (1 shape)
                 | obj " and " obj             (2 shapes)
                 | obj ", " obj " and " obj    (3 shapes)       -- left to right
    obj         := article color " " shape " " where
    where       := "on the left" | "on the right" | "at the top" | "at the bottom"
                 | "in the center"
    background_phrase := article color " background"     (plain, e.g. "a white background")
                 | "a gradient background" | "a noisy background"

e.g. ``A red circle on the left and a blue square on the right, on a white background.``
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
"""The shape kinds."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "orange": (245, 135, 25),
    "purple": (135, 55, 175),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
"""Shape colours and their nominal RGB values (rendering jitters them by up to 12)."""

BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "blue": (40, 80, 200),
    "green": (40, 150, 60),
    "yellow": (240, 220, 60),
    "red": (205, 40, 40),
}
"""Named plain background colours."""

BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "noisy")

#: Background classes as the model learns them: the plain colour names, then these two.
BACKGROUND_CLASSES: tuple[str, ...] = (*BACKGROUND_COLORS, "gradient", "noisy")

WHERE: tuple[str, ...] = (
    "on the left",
    "on the right",
    "at the top",
    "at the bottom",
    "in the center",
)
"""Position phrases, indexed by :func:`position_class`."""

NUMBERS: tuple[str, ...] = ("One", "Two", "Three")

QUESTION_TYPES: tuple[str, ...] = (
    "shape",
    "shapes",
    "color",
    "count",
    "where",
    "is_there",
    "describe",
)
"""The question types, in the order evaluation tables list them."""

POSITION_MARGIN = 0.035
ORDER_MARGIN = 0.06
MIN_COLOR_DISTANCE = 120.0
MAX_ROTATION = 15.0
MIN_SIZE, MAX_SIZE = 0.10, 0.60


@dataclass(frozen=True)
class Shape:
    """One shape in a scene.

    Attributes:
        kind: One of :data:`SHAPES`.
        color: One of :data:`COLORS`.
        x: Centre x as a fraction of the image width.
        y: Centre y as a fraction of the image height.
        size: Bounding-circle diameter as a fraction of the image's short side.
        angle: Rotation in degrees.
        rgb: The exact fill colour.
    """

    kind: str
    color: str
    x: float
    y: float
    size: float
    angle: float
    rgb: tuple[int, int, int]

    @property
    def where(self) -> str:
        """The position phrase ("on the left", ...)."""
        return WHERE[position_class(self.x, self.y)]


@dataclass(frozen=True)
class Background:
    """A background.

    Attributes:
        kind: "plain", "gradient" or "noisy".
        color: The colour name for a plain background, else None.
        rgb: The plain colour, the gradient's start or the noisy background's base.
        rgb2: The gradient's end colour (same as ``rgb`` otherwise).
        angle: The gradient direction in degrees.
        noise: Noise standard deviation (noisy backgrounds), in 0..255 units.
        seed: Seed of the noise pattern.
    """

    kind: str
    color: str | None
    rgb: tuple[int, int, int]
    rgb2: tuple[int, int, int]
    angle: float = 0.0
    noise: float = 0.0
    seed: int = 0

    @property
    def label(self) -> str:
        """The background class: its colour name, "gradient" or "noisy"."""
        return self.color if self.kind == "plain" and self.color else self.kind


@dataclass(frozen=True)
class Scene:
    """A scene: image size, background and shapes sorted left to right."""

    width: int
    height: int
    background: Background
    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    def find(self, kind: str) -> Shape | None:
        """The shape of this kind, if any."""
        for s in self.shapes:
            if s.kind == kind:
                return s
        return None


def position_class(x: float, y: float) -> int:
    """Index into :data:`WHERE` for a centre at fractions ``(x, y)`` (see module docs)."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < 1 / 6:
        return 4
    if abs(dx) >= abs(dy):
        return 0 if dx < 0 else 1
    return 2 if dy < 0 else 3


def _ambiguous(x: float, y: float) -> bool:
    dx, dy = abs(x - 0.5), abs(y - 0.5)
    m = POSITION_MARGIN
    return abs(max(dx, dy) - 1 / 6) < m or (max(dx, dy) >= 1 / 6 and abs(dx - dy) < m)


def _dist(a: Sequence[int], b: Sequence[int]) -> float:
    return math.sqrt(sum((int(p) - int(q)) ** 2 for p, q in zip(a, b, strict=True)))


def _jitter(rng: random.Random, rgb: Sequence[int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def sample_background(rng: random.Random) -> Background:
    """Draw a background: plain named colour (50%), gradient (25%) or noisy (25%)."""
    r = rng.random()
    if r < 0.5:
        name = rng.choice(list(BACKGROUND_COLORS))
        rgb = _jitter(rng, BACKGROUND_COLORS[name], 8)
        return Background("plain", name, rgb, rgb)

    def muted() -> tuple[int, int, int]:
        return (rng.randint(40, 235), rng.randint(40, 235), rng.randint(40, 235))

    if r < 0.75:
        return Background("gradient", None, muted(), muted(), angle=rng.uniform(0, 360))
    base = muted()
    return Background(
        "noisy", None, base, base, noise=rng.uniform(8, 22), seed=rng.randrange(1 << 30)
    )


def allowed_colors(bg: Background) -> list[str]:
    """Shape colours that are far enough from the background to be seen."""
    refs = [bg.rgb, bg.rgb2]
    if bg.kind == "gradient":
        r, g, b = ((a + c) // 2 for a, c in zip(bg.rgb, bg.rgb2, strict=True))
        refs.append((r, g, b))
    return [
        c for c, rgb in COLORS.items() if all(_dist(rgb, r) >= MIN_COLOR_DISTANCE for r in refs)
    ]


def sample_size(
    rng: random.Random,
    aspect: tuple[float, float] = (0.75, 4 / 3),
    short: tuple[int, int] = (160, 480),
) -> tuple[int, int]:
    """Draw an image size: short side in ``short``, width/height ratio in ``aspect``."""
    a = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    s = rng.randint(*short)
    return (round(s * a), s) if a >= 1 else (s, round(s / a))


def sample_scene(
    rng: random.Random,
    *,
    n_shapes: int | None = None,
    size: tuple[int, int] | None = None,
    aspect: tuple[float, float] = (0.75, 4 / 3),
    size_range: tuple[float, float] = (MIN_SIZE, MAX_SIZE),
) -> Scene:
    """Draw a scene (see the module docstring for the rules).

    Args:
        rng: The random source (the scene is a pure function of its state).
        n_shapes: 1, 2 or 3; random when None.
        size: Image (width, height); drawn with :func:`sample_size` when None.
        aspect: Width/height ratio range used when ``size`` is None.
        size_range: Shape size range as fractions of the short side.
    """
    n = n_shapes or rng.choice((1, 2, 3))
    w, h = size or sample_size(rng, aspect)
    short = min(w, h)
    while True:
        bg = sample_background(rng)
        colors = allowed_colors(bg)
        if len(colors) >= 2:
            break
    kinds = rng.sample(SHAPES, n)
    for _attempt in range(200):
        shapes: list[Shape] = []
        # Several big shapes cannot fit: cap the size by the number of shapes.
        hi = min(size_range[1], (0.60, 0.45, 0.36)[n - 1])
        ok = True
        for kind in kinds:
            placed = False
            for _try in range(60):
                sz = rng.uniform(size_range[0], max(size_range[0], hi))
                r_px = sz * short / 2
                if 2 * r_px >= min(w, h):
                    continue
                cx = rng.uniform(r_px, w - r_px) / w
                cy = rng.uniform(r_px, h - r_px) / h
                if _ambiguous(cx, cy):
                    continue
                clash = False
                for o in shapes:
                    d = math.hypot((cx - o.x) * w, (cy - o.y) * h)
                    if d < 0.9 * (r_px + o.size * short / 2) or abs(cx - o.x) < ORDER_MARGIN:
                        clash = True
                        break
                if clash:
                    continue
                color = rng.choice(colors)
                shapes.append(
                    Shape(
                        kind,
                        color,
                        cx,
                        cy,
                        sz,
                        rng.uniform(-MAX_ROTATION, MAX_ROTATION),
                        _jitter(rng, COLORS[color], 12),
                    )
                )
                placed = True
                break
            if not placed:
                ok = False
                break
        if ok:
            return Scene(w, h, bg, tuple(sorted(shapes, key=lambda s: s.x)))
    raise RuntimeError("could not place shapes")  # pragma: no cover - practically unreachable


# ---------------------------------------------------------------------------------------
# Language


def article(word: str) -> str:
    """ "an" before a vowel, else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def noun_phrase(s: Shape) -> str:
    """ "a red circle" / "an orange star"."""
    return f"{article(s.color)} {s.color} {s.kind}"


def join_list(items: Sequence[str]) -> str:
    """ "x", "x and y", "x, y and z"."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def background_phrase(bg: Background) -> str:
    """ "a white background" / "a gradient background" / "a noisy background"."""
    label = bg.label
    return f"{article(label)} {label} background"


def describe(scene: Scene) -> str:
    """The canonical one-sentence description (grammar in the module docstring)."""
    objs = [f"{noun_phrase(s)} {s.where}" for s in scene.shapes]
    return _cap(f"{join_list(objs)}, on {background_phrase(scene.background)}.")


QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("What shape is in the image?",),
    "shapes": ("What shapes are in the image?",),
    "color": ("What color is the {shape}?",),
    "count": ("How many shapes are there?",),
    "where": ("Where is the {shape}?",),
    "is_there": ("Is there a {shape}?",),
    "describe": ("Describe the image.", "Describe this image in one sentence."),
}
"""The exact question phrasings per type."""


def answer(scene: Scene, qtype: str, shape: str | None = None) -> str:
    """The canonical answer to a question of type ``qtype`` about ``shape``.

    Raises:
        ValueError: Unknown type, missing shape, or "shape" asked of a multi-shape scene.
    """
    if qtype == "shape":
        if len(scene.shapes) != 1:
            raise ValueError("'What shape is in the image?' is only asked of one-shape scenes")
        return _cap(noun_phrase(scene.shapes[0])) + "."
    if qtype == "shapes":
        return _cap(join_list([noun_phrase(s) for s in scene.shapes])) + "."
    if qtype == "count":
        return NUMBERS[len(scene.shapes) - 1] + "."
    if qtype == "describe":
        return describe(scene)
    if shape is None:
        raise ValueError(f"question type {qtype!r} needs a shape")
    found = scene.find(shape)
    if qtype == "is_there":
        return "Yes." if found else "No."
    if found is None:
        return f"There is no {shape}."
    if qtype == "color":
        return _cap(found.color) + "."
    if qtype == "where":
        return _cap(found.where) + "."
    raise ValueError(f"unknown question type {qtype!r}")


@dataclass(frozen=True)
class QA:
    """One question with its canonical answer."""

    qtype: str
    question: str
    answer: str


def sample_question(rng: random.Random, scene: Scene, qtype: str | None = None) -> QA:
    """Draw a question about ``scene`` (of ``qtype`` if given) with its answer.

    For shape-specific questions the asked shape is present half the time.
    """
    if qtype is None:
        types = [t for t in QUESTION_TYPES if t != "shape" or len(scene.shapes) == 1]
        qtype = rng.choice(types)
    template = rng.choice(QUESTION_TEMPLATES[qtype])
    shape = None
    if "{shape}" in template:
        present = [s.kind for s in scene.shapes]
        absent = [k for k in SHAPES if k not in present]
        shape = rng.choice(present) if (rng.random() < 0.5 or not absent) else rng.choice(absent)
        template = template.format(shape=shape)
    return QA(qtype, template, answer(scene, qtype, shape))


SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You answer questions about images.",
    "You are a helpful assistant that answers questions about images.",
    "Answer briefly.",
    "Answer the question about the image.",
    "You are a vision assistant. Be concise.",
    "Look at the image and answer in one short sentence.",
)
"""System messages seen in training (any system message should work)."""


def conversation(
    rng: random.Random,
    scene: Scene,
    image: object,
    *,
    turns: int = 1,
    system: str | None = None,
    image_first: bool = True,
    qtypes: Sequence[str] | None = None,
) -> tuple[list[dict], list[QA]]:
    """A conversation about one image, in the OpenAI message form.

    Args:
        rng: Random source.
        scene: The scene shown.
        image: The ``image_url`` URL (path or data URL) for the image part.
        turns: Number of user/assistant exchanges (the image is in the first one).
        system: Optional system message.
        image_first: Put the image before the question text (else after it).
        qtypes: Question types per turn (random when None).

    Returns:
        ``(messages, qas)``: the messages including every assistant answer, and the
        question/answer pairs in order. To ask turn ``k``, send ``messages`` up to and
        including the ``k``-th user message.
    """
    messages: list[dict] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    qas = []
    for t in range(turns):
        qa = sample_question(rng, scene, qtypes[t] if qtypes else None)
        qas.append(qa)
        if t == 0:
            img = {"type": "image_url", "image_url": {"url": image}}
            txt = {"type": "text", "text": qa.question}
            content: list[dict] | str = [img, txt] if image_first else [txt, img]
        else:
            content = qa.question
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": qa.answer})
    return messages, qas

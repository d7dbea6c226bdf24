"""Scene graphs of the synthetic world and their Pillow renderings.

A scene is 1-3 coloured shapes on a 3x3 grid of cells (at most one per cell), and in some scenes one more
cell holds a sign with a word (DejaVu fonts) or a card with a real handwritten digit (scikit-learn's UCI
digits, 8x8 scans upscaled). Everything a caption or question says is read from the `Scene`, never from
pixels, so answers are right by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 224
SUPERSAMPLE = 2  # drawn at 448 x 448 and box-filtered down: anti-aliased edges for free
COLOURS = {  # name -> RGB; all far from the pale backgrounds
    "red": (220, 30, 30), "orange": (245, 135, 20), "yellow": (235, 200, 20), "green": (40, 150, 60),
    "blue": (30, 80, 220), "purple": (130, 50, 180), "pink": (240, 110, 180), "brown": (125, 75, 35),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
SIZES = {"small": 14.0, "large": 26.0}  # radius in pixels of the 224 x 224 image
EXTENT = 1.25  # the farthest a shape's vertex reaches, in radii (square corners)
# Row-major cells 0..8: (short name, phrase that follows a noun and takes " of the image").
POSITIONS = (
    ("top left", "in the top left corner"), ("top", "at the top"), ("top right", "in the top right corner"),
    ("left", "on the left side"), ("center", "in the center"), ("right", "on the right side"),
    ("bottom left", "in the bottom left corner"), ("bottom", "at the bottom"),
    ("bottom right", "in the bottom right corner"),
)
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")  # Debian's fonts-dejavu-core
FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf")
# Sign words: short, upper case, none of them a colour, shape or number word.
WORDS = (
    "OPEN", "CLOSED", "STOP", "EXIT", "SALE", "PARK", "CAFE", "BOOKS", "SHOP", "HOTEL", "BANK", "TAXI", "BUS",
    "TRAIN", "PIZZA", "BREAD", "MILK", "FISH", "TOYS", "MUSIC", "DANCE", "SLOW", "WAIT", "PUSH", "PULL", "HELP",
    "INFO", "ROAD", "NORTH", "SOUTH", "EAST", "WEST", "RIVER", "LAKE", "BEACH", "FARM", "ZOO", "CITY", "HOME",
    "BAKERY", "FRUIT", "APPLE", "LEMON", "MANGO", "GRAPE", "PEACH", "CANDY", "CAKE", "TEA", "COFFEE", "JUICE",
    "WATER", "FIRE", "ICE", "SNOW", "RAIN", "SUN", "MOON", "CLOUD", "WIND", "TREE", "FLOWER", "GARDEN", "HOUSE",
    "DOOR", "WINDOW", "TABLE", "CHAIR", "LAMP", "CLOCK", "PHONE", "RADIO", "PAPER", "PENCIL", "SCHOOL", "CLASS",
    "MATH", "ART", "SPORT", "GAME", "PLAY", "WIN", "LOSE", "TEAM", "GOAL", "BALL", "BIKE", "BOAT", "SHIP",
    "PLANE", "TRUCK", "CAR", "PORT", "GATE", "BRIDGE", "TOWER", "CASTLE", "KING", "QUEEN", "HORSE", "DOG", "CAT",
    "BIRD", "MOUSE", "TIGER", "LION", "BEAR", "WOLF", "FOX", "FROG", "DUCK", "GOAT", "SHEEP", "COW", "HONEY",
    "SALT", "SUGAR", "RICE", "SOUP", "MEAT", "EGGS", "CHEESE", "FRESH", "HOT", "COLD", "NEW", "OLD", "FREE",
    "QUIET", "DANGER", "ENTER", "LOBBY", "OFFICE", "CLINIC", "MARKET", "STORE", "MUSEUM", "LIBRARY", "THEATER",
)
DIGIT_HELDOUT_EVERY = 5  # UCI digit scans with index % 5 == 0 appear only in held-out scenes


class WorldError(ValueError):
    """Bad options for the world generator, or a missing resource it names (font, espeak-ng, scikit-learn)."""


@dataclass(frozen=True)
class Shape:
    """One coloured shape in grid cell ``cell`` (0..8, row-major), its centre moved by ``offset`` pixels."""

    shape: str
    colour: str
    size: str
    cell: int
    offset: tuple[float, float] = (0.0, 0.0)

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape


@dataclass(frozen=True)
class Sign:
    """A sign reading ``word`` (upper case) in ``cell``, drawn with font ``font`` (an index into `FONTS`)."""

    word: str
    cell: int
    font: int = 0


@dataclass(frozen=True)
class Digit:
    """Scan ``index`` of scikit-learn's digits (showing ``value``) on a white card in ``cell``."""

    value: int
    index: int
    cell: int


@dataclass(frozen=True)
class Scene:
    """What a scene holds: shapes in reading order, an optional sign or digit, the background RGB."""

    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    sign: Sign | None = None
    digit: Digit | None = None

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return {s.pair for s in self.shapes}


def all_pairs() -> list[tuple[str, str]]:
    """Every (colour, shape) pair, colours outer."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def heldout_pairs(rng: np.random.Generator) -> list[tuple[str, str]]:
    """One held-out shape per colour, the shapes spread evenly, so every colour and shape stays in training."""
    colours = list(COLOURS)
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    return sorted((c, shapes[i % len(shapes)]) for i, c in enumerate(colours))


# ------------------------------------------------------------------------------------------ sampling
@lru_cache(maxsize=1)
def digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's UCI handwritten digits: images ``[1797, 8, 8]`` (ink 0..16) and values ``[1797]``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise WorldError("handwritten digits need scikit-learn: pip install 'imagebind-llm[world]'") from None
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def digit_indices(heldout: bool) -> np.ndarray:
    """The scan indices a split draws from (held-out scenes get handwriting training never shows)."""
    index = np.arange(len(digit_scans()[1]))
    return index[(index % DIGIT_HELDOUT_EVERY == 0) == heldout]


def sample_scene(rng: np.random.Generator, exclude: frozenset[tuple[str, str]] = frozenset(),
                 require: tuple[str, str] | None = None, n_shapes: int | None = None, text: str | None = None,
                 heldout: bool = False) -> Scene:
    """A random scene.

    Args:
        exclude: (colour, shape) pairs that must not occur (the held-out pairs, for training scenes).
        require: a pair that must occur, exactly once and as the only shape of its kind (held-out scenes), so
            that "the star" and "the red star" name it.
        n_shapes: how many shapes (default: 1-3 uniformly).
        text: ``"sign"``, ``"digit"`` or ``"none"`` (default: sign 30 %, digit 20 %).
        heldout: draw digits from the held-out scans.
    """
    n_shapes = int(rng.integers(1, 4)) if n_shapes is None else n_shapes
    text = str(rng.choice(["sign", "digit", "none"], p=[0.3, 0.2, 0.5])) if text is None else text
    if text not in ("sign", "digit", "none"):
        raise WorldError(f"text must be 'sign', 'digit' or 'none', got {text!r}")
    if not 1 <= n_shapes <= 9 - (text != "none"):
        raise WorldError(f"n_shapes={n_shapes} does not fit the 3 x 3 grid (1 to {9 - (text != 'none')})")
    cells = [int(c) for c in rng.permutation(9)[: n_shapes + (text != "none")]]
    allowed = [p for p in all_pairs() if p not in exclude and (require is None or p[1] != require[1])]
    pairs = [require] if require is not None else []
    pairs += [allowed[i] for i in rng.integers(len(allowed), size=n_shapes - len(pairs))]
    shapes = []
    for (colour, shape), cell in zip(pairs, cells):
        size = str(rng.choice(list(SIZES)))
        room = IMAGE_SIZE / 6 - EXTENT * SIZES[size] - 1  # stays inside its cell
        offset = tuple(float(x) for x in np.round(rng.uniform(-room, room, size=2), 1))
        shapes.append(Shape(shape, colour, size, cell, offset))
    background = tuple(int(x) for x in rng.integers(205, 246, size=3))
    sign = digit = None
    if text == "sign":
        sign = Sign(str(rng.choice(WORDS)), cells[-1], int(rng.integers(len(FONTS))))
    elif text == "digit":
        index = int(rng.choice(digit_indices(heldout)))
        digit = Digit(int(digit_scans()[1][index]), index, cells[-1])
    return Scene(tuple(sorted(shapes, key=lambda s: s.cell)), background, sign, digit)


def counterfactual(scene: Scene, rng: np.random.Generator, exclude: frozenset[tuple[str, str]] = frozenset(),
                   heldout: bool = False) -> Scene:
    """``scene`` with exactly one thing changed that colours, sizes and places do not tell apart: the kind of
    one shape (its colour, size and place kept; never a pair of ``exclude``), the sign's word, or the digit
    (another scan of another value). Scenes and their counterfactuals in one contrastive batch are one
    another's hard negatives: the loss then needs shapes and reading, which random batches never ask for."""
    options: list[int | str] = [i for i, s in enumerate(scene.shapes)
                                if any(k != s.shape and (s.colour, k) not in exclude for k in SHAPES)]
    options += ["text"] if scene.sign is not None or scene.digit is not None else []
    choice = options[int(rng.integers(len(options)))]
    if choice == "text" and scene.sign is not None:
        word = str(rng.choice([w for w in WORDS if w != scene.sign.word]))
        return replace(scene, sign=replace(scene.sign, word=word))
    if choice == "text":
        values = digit_scans()[1]
        index = int(rng.choice([i for i in digit_indices(heldout) if values[i] != scene.digit.value]))
        return replace(scene, digit=Digit(int(values[index]), index, scene.digit.cell))
    old = scene.shapes[choice]
    kinds = [k for k in SHAPES if k != old.shape and (old.colour, k) not in exclude]
    shapes = list(scene.shapes)
    shapes[choice] = replace(old, shape=str(rng.choice(kinds)))
    return replace(scene, shapes=tuple(shapes))


# ------------------------------------------------------------------------------------------ rendering
def cell_centre(cell: int) -> tuple[float, float]:
    """Pixel centre ``(x, y)`` of a grid cell in the 224 x 224 image."""
    step = IMAGE_SIZE / 3
    return (cell % 3 + 0.5) * step, (cell // 3 + 0.5) * step


def shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a shape of radius ``r`` centred at ``(x, y)`` (image coordinates, y down); circles excluded."""
    def ring(n: int, radii: list[float], turn: float) -> list[tuple[float, float]]:
        angles = turn + 2 * np.pi * np.arange(n) / n
        return [(x + rr * np.cos(a), y - rr * np.sin(a)) for a, rr in zip(angles, np.resize(radii, n))]

    if shape == "square":
        return ring(4, [r * 1.25], np.pi / 4)
    if shape == "diamond":
        return ring(4, [r * 1.1], np.pi / 2)
    if shape == "triangle":
        return [(x0, y0 + r * 0.2) for x0, y0 in ring(3, [r * 1.2], np.pi / 2)]
    if shape == "star":
        return ring(10, [r * 1.2, r * 0.5], np.pi / 2)
    if shape == "hexagon":
        return ring(6, [r * 1.05], 0.0)
    if shape == "cross":
        a, b = r * 0.35, r
        return [(x + u, y + v) for u, v in [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                                            (-a, a), (-b, a), (-b, -a), (-a, -a)]]
    raise WorldError(f"unknown shape {shape!r}; choose one of {SHAPES}")


@lru_cache(maxsize=64)
def font(index: int, size: int) -> ImageFont.FreeTypeFont:
    """DejaVu font ``FONTS[index]`` at ``size`` pixels."""
    path = FONT_DIR / FONTS[index]
    if not path.is_file():
        raise WorldError(f"font {path} is missing; install Debian's fonts-dejavu-core")
    return ImageFont.truetype(str(path), size)


def _draw_sign(draw: ImageDraw.ImageDraw, sign: Sign, k: int) -> None:
    x, y = cell_centre(sign.cell)
    w, h = IMAGE_SIZE / 3 - 6, 28
    box = [k * (x - w / 2), k * (y - h / 2), k * (x + w / 2), k * (y + h / 2)]
    draw.rounded_rectangle(box, radius=3 * k, fill=(250, 250, 240), outline=(40, 40, 40), width=2 * k)
    size = 18 * k
    while font(sign.font, size).getlength(sign.word) > k * (w - 8):  # shrink long words to fit
        size -= k
    draw.text((k * x, k * y), sign.word, fill=(15, 15, 15), font=font(sign.font, size), anchor="mm")


def digit_card(index: int, size: int) -> Image.Image:
    """Scan ``index`` as dark ink on a white ``size x size`` card (bicubic upscaling of the 8 x 8 scan)."""
    ink = Image.fromarray(np.uint8(np.round(digit_scans()[0][index] * (255 / 16))), mode="L")
    ink = ink.resize((size * 3 // 4, size * 3 // 4), Image.Resampling.BICUBIC)
    card = Image.new("L", (size, size), 0)
    card.paste(ink, (size // 8, size // 8))
    return Image.eval(card, lambda v: 255 - v * 230 // 255).convert("RGB")


def render_scene(scene: Scene) -> Image.Image:
    """The scene as a 224 x 224 RGB image."""
    k = SUPERSAMPLE
    image = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        cx, cy = cell_centre(s.cell)
        x, y, r = k * (cx + s.offset[0]), k * (cy + s.offset[1]), k * SIZES[s.size]
        if s.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=COLOURS[s.colour])
        else:
            draw.polygon(shape_polygon(s.shape, x, y, r), fill=COLOURS[s.colour])
    if scene.sign is not None:
        _draw_sign(draw, scene.sign, k)
    if scene.digit is not None:
        x, y = cell_centre(scene.digit.cell)
        size = 56 * k
        image.paste(digit_card(scene.digit.index, size), (int(k * x) - size // 2, int(k * y) - size // 2))
    return image.reduce(k)

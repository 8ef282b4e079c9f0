"""The closed vocabulary of the synthetic world: colours, shapes, sizes, places and numbers.

Every word a scene graph can hold comes from these tables; `texts.grammar_words()` adds the words of
the text templates on top of them to give the tokenizer's vocabulary.
"""

from __future__ import annotations

# Object colours (RGB). No object colour is a background colour, so nothing blends into the ground.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "heart": "hearts",
}

SIZES: tuple[str, ...] = ("small", "large")
# Object radius as a fraction of the image side, per size.
SIZE_RADII: dict[str, float] = {"small": 0.09, "large": 0.155}

# Solid backgrounds (RGB) and one noise background, drawn per pixel from [0, NOISE_MAX).
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (110, 110, 110),
    "brown": (100, 60, 30),
}
NOISE_BACKGROUND = "noise"
NOISE_MAX = 90
BACKGROUNDS: tuple[str, ...] = (*BACKGROUND_COLOURS, NOISE_BACKGROUND)

# Coarse places on a 3 x 3 grid, indexed [row][column] with row 0 at the top.
POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
# Synonyms that a minority of VQA annotators use for a position answer.
POSITION_SYNONYMS: dict[str, str] = {
    "top left": "upper left",
    "top": "top middle",
    "top right": "upper right",
    "left": "middle left",
    "center": "middle",
    "right": "middle right",
    "bottom left": "lower left",
    "bottom": "bottom middle",
    "bottom right": "lower right",
}

# How a sentence places an object: "the red circle is in the top left corner".
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}

# Pairwise relations, named for the first object: "the red circle is left of the blue star".
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_INVERSES: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}

# Clip motion directions and their unit steps in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}

# How a sentence says a direction: "moves to the left".
DIRECTION_PHRASES: dict[str, str] = {
    "left": "to the left",
    "right": "to the right",
    "up": "upward",
    "down": "downward",
}

NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "existence", "relation")
CLIP_QUESTION_TYPES: tuple[str, ...] = ("direction", "colour", "count")


def parse_composition(text: str) -> tuple[str, str]:
    """Parses "colour shape" (e.g. "red circle") into (colour, shape).

    Raises:
      ValueError: naming the valid colours and shapes when either word is unknown.
    """
    words = text.strip().lower().split()
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
        raise ValueError(
            f"held-out composition {text!r} is not 'colour shape'; colours: "
            f"{', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}"
        )
    return words[0], words[1]

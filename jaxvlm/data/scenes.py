"""Scene graphs of the synthetic world: seeded sampling of still scenes and moving clips.

A scene graph is a JSON-ready dict:

    {"scene_id": int, "background": "black" | "gray" | "brown" | "noise",
     "objects": [{"colour": str, "shape": str, "size": "small" | "large",
                  "centre": [x, y], "radius": float, "bbox": [x0, y0, x1, y1],
                  "position": "top left" | ... | "bottom right"}, ...]}

in pixel coordinates (x to the right, y down, pixel (i, j) covers [j, j+1) x [i, i+1)). A clip graph
has "clip_id" instead of "scene_id", and its objects hold "direction" plus per-frame "centres" and
"bboxes" lists instead of "centre", "bbox" and "position". Within a scene or clip every
(colour, shape) composition occurs at most once, so "the red circle" always names one object.
Objects never leave the image, and centres lie at least 0.95 (r_a + r_b) apart (in every frame for
clips), so shapes, which fit inside their radius, barely touch.
"""

from __future__ import annotations

import itertools

import numpy as np

from jaxvlm.data import render, vocabulary

_MIN_DISTANCE_FACTOR = 0.95
_PLACEMENT_CANDIDATES = 64
_MAX_ATTEMPTS = 100
# Total displacement of a moving object over a clip, as a fraction of the image side.
CLIP_DISPLACEMENT = 0.3

Composition = tuple[str, str]


def all_compositions() -> list[Composition]:
    """Every (colour, shape) pair, in vocabulary order."""
    return list(itertools.product(vocabulary.COLOURS, vocabulary.SHAPES))


def _quantise(values: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(values) * render.SUBPIXEL) / render.SUBPIXEL


def position_word(centre: tuple[float, float], image_size: int) -> str:
    """The 3 x 3 grid cell of a centre: "top left", "top", ..., "center", ..., "bottom right"."""
    column = min(int(centre[0] * 3 / image_size), 2)
    row = min(int(centre[1] * 3 / image_size), 2)
    return vocabulary.POSITIONS[row][column]


def relation(first: dict, second: dict) -> str:
    """How `first` stands to `second` along the larger centre offset: "left of", "above", ..."""
    dx = first["centre"][0] - second["centre"][0]
    dy = first["centre"][1] - second["centre"][1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _choose_compositions(
    rng: np.random.Generator,
    num_objects: int,
    allowed: list[Composition],
    required: list[Composition],
) -> list[Composition]:
    """Distinct compositions; with `required`, the first is drawn from it and the rest from all."""
    if required:
        first = required[rng.integers(len(required))]
        pool = [c for c in all_compositions() if c != first]
        picks = rng.choice(len(pool), size=num_objects - 1, replace=False)
        chosen = [first, *(pool[i] for i in picks)]
        order = rng.permutation(num_objects)
        return [chosen[i] for i in order]
    picks = rng.choice(len(allowed), size=num_objects, replace=False)
    return [allowed[i] for i in picks]


def _place(
    rng: np.random.Generator, radii: list[float], image_size: int, travel: np.ndarray | None = None
) -> np.ndarray | None:
    """Centres (N, 2) of objects with `radii`, or None when a random placement fails.

    With `travel` (N, F, 2): per-frame offsets; the whole path must stay inside and apart.
    """
    placed: list[np.ndarray] = []  # each (F, 2): the path of a placed object
    for index, radius in enumerate(radii):
        offsets = np.zeros((1, 2)) if travel is None else travel[index]
        low = radius + 1 - offsets.min(axis=0)
        high = image_size - radius - 1 - offsets.max(axis=0)
        if np.any(high <= low):
            return None
        starts = _quantise(rng.uniform(low, high, size=(_PLACEMENT_CANDIDATES, 2)))
        paths = starts[:, None, :] + offsets[None]  # (C, F, 2)
        valid = np.ones(len(starts), dtype=bool)
        for other_index, other_path in enumerate(placed):
            gaps = np.linalg.norm(paths - other_path[None], axis=-1).min(axis=1)
            valid &= gaps >= _MIN_DISTANCE_FACTOR * (radius + radii[other_index])
        if not valid.any():
            return None
        placed.append(paths[np.argmax(valid)])
    return np.stack([path[0] for path in placed])


def _radius(size: str, image_size: int) -> float:
    return vocabulary.SIZE_RADII[size] * image_size


def _object(colour: str, shape: str, size: str, centre: np.ndarray, image_size: int) -> dict:
    radius = _radius(size, image_size)
    return {
        "colour": colour,
        "shape": shape,
        "size": size,
        "centre": [float(centre[0]), float(centre[1])],
        "radius": radius,
        "bbox": render.bounding_box(shape, centre, radius),
        "position": position_word(centre, image_size),
    }


def sample_scene(
    rng: np.random.Generator,
    *,
    scene_id: int,
    image_size: int,
    max_objects: int,
    allowed: list[Composition],
    required: list[Composition] = (),
) -> dict:
    """Samples a still scene graph.

    Args:
      rng: the scene's own generator (seeded from world seed, split and scene id).
      scene_id: index of the scene in its split.
      image_size: side S of the square image in pixels.
      max_objects: objects per scene are uniform in [1, max_objects].
      allowed: compositions to draw from.
      required: when non-empty, one object is drawn from these (the held-out split).
    """
    background = vocabulary.BACKGROUNDS[rng.integers(len(vocabulary.BACKGROUNDS))]
    for _ in range(_MAX_ATTEMPTS):
        num_objects = int(rng.integers(1, max_objects + 1))
        compositions = _choose_compositions(rng, num_objects, allowed, list(required))
        sizes = [vocabulary.SIZES[i] for i in rng.integers(len(vocabulary.SIZES), size=num_objects)]
        centres = _place(rng, [_radius(size, image_size) for size in sizes], image_size)
        if centres is not None:
            objects = [
                _object(colour, shape, size, centre, image_size)
                for (colour, shape), size, centre in zip(compositions, sizes, centres, strict=True)
            ]
            return {"scene_id": scene_id, "background": background, "objects": objects}
    raise RuntimeError(f"could not place objects in a {image_size}px image for scene {scene_id}")


def sample_clip(
    rng: np.random.Generator,
    *,
    clip_id: int,
    image_size: int,
    num_frames: int,
    max_objects: int,
    allowed: list[Composition],
) -> dict:
    """Samples a clip graph: 1..max_objects objects, each moving at constant speed one way.

    Every object travels CLIP_DISPLACEMENT * image_size pixels (to the nearest 1/render.SUBPIXEL per
    frame)
    in its direction ("left", "right", "up" or "down") over the clip.
    """
    background = vocabulary.BACKGROUNDS[rng.integers(len(vocabulary.BACKGROUNDS))]
    step = _quantise(CLIP_DISPLACEMENT * image_size / max(num_frames - 1, 1))
    frames = np.arange(num_frames)[:, None]
    directions_all = list(vocabulary.DIRECTIONS)
    for _ in range(_MAX_ATTEMPTS):
        num_objects = int(rng.integers(1, max_objects + 1))
        compositions = _choose_compositions(rng, num_objects, allowed, [])
        sizes = [vocabulary.SIZES[i] for i in rng.integers(len(vocabulary.SIZES), size=num_objects)]
        directions = [directions_all[i] for i in rng.integers(4, size=num_objects)]
        travel = np.stack(
            [frames * step * np.array(vocabulary.DIRECTIONS[d], dtype=float) for d in directions]
        )  # (N, F, 2)
        radii = [_radius(size, image_size) for size in sizes]
        starts = _place(rng, radii, image_size, travel)
        if starts is None:
            continue
        objects = []
        for index, ((colour, shape), size, direction) in enumerate(
            zip(compositions, sizes, directions, strict=True)
        ):
            path = starts[index][None] + travel[index]
            objects.append(
                {
                    "colour": colour,
                    "shape": shape,
                    "size": size,
                    "radius": radii[index],
                    "direction": direction,
                    "centres": path.tolist(),
                    "bboxes": [render.bounding_box(shape, centre, radii[index]) for centre in path],
                }
            )
        return {"clip_id": clip_id, "background": background, "objects": objects}
    raise RuntimeError(f"could not place moving objects in a {image_size}px clip {clip_id}")

"""Vectorised numpy rasteriser for scene graphs: anti-aliased shapes on solid or noise grounds.

Each shape is an inside test in unit coordinates (u right, v down, the shape inside the unit disc).
Coverage masks are supersampled once per (image size, shape, size, sub-pixel offset) and cached;
centres are multiples of 1 / SUBPIXEL pixels, so drawing a batch of scenes is a gather of masks and
one alpha blend per object slot, with no per-object Python work.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxvlm.data import vocabulary

SUBPIXEL = 4
_SUPERSAMPLE = 8  # samples per pixel side when building coverage masks
_CHUNK = 128  # scenes drawn at once


def _star_vertices(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)


_TRIANGLE = np.array([[0.0, -1.0], [math.sqrt(3) / 2, 0.5], [-math.sqrt(3) / 2, 0.5]])
_STAR = _star_vertices()


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: inside when a ray towards +u crosses the outline an odd number of times."""
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    for (u1, v1), (u2, v2) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if v1 == v2:
            continue
        crosses = (v1 > v) != (v2 > v)
        u_at = u1 + (v - v1) * (u2 - u1) / (v2 - v1)
        inside ^= crosses & (u < u_at)
    return inside


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether unit-coordinate points (u right, v down) lie inside `shape`; bool like u."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        return _inside_polygon(u, v, _TRIANGLE)
    if shape == "star":
        return _inside_polygon(u, v, _STAR)
    if shape == "cross":
        bar_u, bar_v = np.abs(u), np.abs(v)
        return ((bar_u <= 0.28) & (bar_v <= 0.85)) | ((bar_v <= 0.28) & (bar_u <= 0.85))
    if shape == "heart":
        # (x^2 + y^2 - 1)^3 <= x^2 y^3, y up, scaled into the unit disc and centred on its box.
        x = u / 0.78
        y = -v / 0.78 + 0.118
        return (x * x + y * y - 1.0) ** 3 <= x * x * y**3
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(vocabulary.SHAPES)}")


@functools.cache
def _unit_extent(shape: str) -> tuple[float, float, float, float]:
    """(u_min, v_min, u_max, v_max) of `shape` on a fine grid."""
    grid = np.linspace(-1.1, 1.1, 881)
    mask = inside(shape, grid[None, :], grid[:, None])
    rows, columns = np.any(mask, axis=1), np.any(mask, axis=0)
    return (
        float(grid[columns.argmax()]),
        float(grid[rows.argmax()]),
        float(grid[len(grid) - 1 - columns[::-1].argmax()]),
        float(grid[len(grid) - 1 - rows[::-1].argmax()]),
    )


def bounding_box(shape: str, centre, radius: float) -> list[float]:
    """Pixel box [x0, y0, x1, y1] of a shape with this centre and radius."""
    u0, v0, u1, v1 = _unit_extent(shape)
    x, y = float(centre[0]), float(centre[1])
    return [
        round(x + u0 * radius, 2),
        round(y + v0 * radius, 2),
        round(x + u1 * radius, 2),
        round(y + v1 * radius, 2),
    ]


def patch_size(image_size: int) -> int:
    """Side P of the square patch that holds any object of this image size."""
    return 2 * math.ceil(max(vocabulary.SIZE_RADII.values()) * image_size) + 3


@functools.cache
def coverage_masks(image_size: int) -> np.ndarray:
    """Coverage float32[shapes, sizes, SUBPIXEL, SUBPIXEL, P, P] in [0, 1].

    Mask [s, z, fy, fx] covers an object whose centre is (floor + fx / SUBPIXEL, floor +
    fy / SUBPIXEL); patch pixel (0, 0) is image pixel (floor(cy) - P // 2, floor(cx) - P // 2).
    """
    size = patch_size(image_size)
    samples = (np.arange(size * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - size // 2  # pixel offsets
    masks = np.zeros(
        (len(vocabulary.SHAPES), len(vocabulary.SIZES), SUBPIXEL, SUBPIXEL, size, size), np.float32
    )
    for shape_index, shape in enumerate(vocabulary.SHAPES):
        for size_index, size_name in enumerate(vocabulary.SIZES):
            radius = vocabulary.SIZE_RADII[size_name] * image_size
            for fy in range(SUBPIXEL):
                v = (samples - fy / SUBPIXEL) / radius
                for fx in range(SUBPIXEL):
                    u = (samples - fx / SUBPIXEL) / radius
                    hits = inside(shape, u[None, :], v[:, None]).astype(np.float32)
                    hits = hits.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE)
                    masks[shape_index, size_index, fy, fx] = hits.mean(axis=(1, 3))
    return masks


@functools.cache
def _coverage_extents(image_size: int) -> np.ndarray:
    """int64[shapes, sizes, SUBPIXEL, SUBPIXEL, 4]: (col0, row0, col1, row1) of each coverage
    mask's pixels with coverage > 0, in patch pixels, end exclusive."""
    covered = coverage_masks(image_size) > 0
    columns, rows = covered.any(axis=-2), covered.any(axis=-1)  # (..., P) each
    size = covered.shape[-1]
    return np.stack(
        [
            columns.argmax(axis=-1),
            rows.argmax(axis=-1),
            size - columns[..., ::-1].argmax(axis=-1),
            size - rows[..., ::-1].argmax(axis=-1),
        ],
        axis=-1,
    )


def pixel_box(shape: str, size: str, centre, image_size: int) -> list[int]:
    """[x0, y0, x1, y1), end exclusive: the pixels `render_scenes` may paint for this object.

    Read off the coverage mask it blends (coverage > 0, a superset of the pixels whose value
    changes), so it is exact at the renderer's resolution, unlike the geometric `bounding_box`.
    """
    # As `_render_chunk` places it: centre in 1/SUBPIXEL steps, split into pixel and fraction.
    steps = np.round(np.asarray(centre, np.float64) * SUBPIXEL).astype(np.int64)
    (floor_x, floor_y), (fraction_x, fraction_y) = np.divmod(steps, SUBPIXEL)
    shape_index, size_index = vocabulary.SHAPES.index(shape), vocabulary.SIZES.index(size)
    extent = _coverage_extents(image_size)[shape_index, size_index, fraction_y, fraction_x]
    half = patch_size(image_size) // 2
    box = [floor_x - half + extent[0], floor_y - half + extent[1]]
    box += [floor_x - half + extent[2], floor_y - half + extent[3]]
    return [int(np.clip(value, 0, image_size)) for value in box]


def _object_arrays(scenes: list[dict], max_objects: int) -> dict[str, np.ndarray]:
    """Flattens (background, objects) lists into padded index arrays of shape (N, K)."""
    num = len(scenes)
    arrays = {
        "count": np.zeros(num, np.int64),
        "shape": np.zeros((num, max_objects), np.int64),
        "size": np.zeros((num, max_objects), np.int64),
        "colour": np.zeros((num, max_objects, 3), np.float32),
        "centre": np.zeros((num, max_objects, 2), np.float64),
    }
    shape_index = {name: i for i, name in enumerate(vocabulary.SHAPES)}
    size_index = {name: i for i, name in enumerate(vocabulary.SIZES)}
    for row, scene in enumerate(scenes):
        arrays["count"][row] = len(scene["objects"])
        for slot, item in enumerate(scene["objects"]):
            arrays["shape"][row, slot] = shape_index[item["shape"]]
            arrays["size"][row, slot] = size_index[item["size"]]
            arrays["colour"][row, slot] = vocabulary.COLOURS[item["colour"]]
            arrays["centre"][row, slot] = item["centre"]
    return arrays


def _backgrounds(scenes: list[dict], noise_seeds: list[int], image_size: int) -> np.ndarray:
    """uint8[N, S, S, 3] grounds; noise grounds come from their seed, so clip frames share one."""
    grounds = np.empty((len(scenes), image_size, image_size, 3), np.uint8)
    for row, (scene, seed) in enumerate(zip(scenes, noise_seeds, strict=True)):
        if scene["background"] == vocabulary.NOISE_BACKGROUND:
            rng = np.random.default_rng(seed)
            grounds[row] = rng.integers(
                0, vocabulary.NOISE_MAX, (image_size, image_size, 3), dtype=np.uint8
            )
        else:
            grounds[row] = vocabulary.BACKGROUND_COLOURS[scene["background"]]
    return grounds


def render_scenes(scenes: list[dict], noise_seeds: list[int], image_size: int) -> np.ndarray:
    """Draws scene graphs (or single clip frames) into uint8[N, S, S, 3] images.

    Args:
      scenes: dicts with "background" and "objects" (each with colour, shape, size, centre).
      noise_seeds: one int per scene, seeding its noise ground (ignored for solid grounds).
      image_size: side S in pixels.
    """
    images = np.zeros((len(scenes), image_size, image_size, 3), np.uint8)
    # Chunks keep the float canvas small enough to stay in cache.
    for start in range(0, len(scenes), _CHUNK):
        stop = start + _CHUNK
        images[start:stop] = _render_chunk(scenes[start:stop], noise_seeds[start:stop], image_size)
    return images


def _render_chunk(scenes: list[dict], noise_seeds: list[int], image_size: int) -> np.ndarray:
    masks = coverage_masks(image_size)
    size = masks.shape[-1]
    margin = size // 2 + 1
    max_objects = max(len(scene["objects"]) for scene in scenes)
    arrays = _object_arrays(scenes, max_objects)
    side = image_size + 2 * margin
    canvas = np.zeros((len(scenes), side, side, 3), np.float32)
    canvas[:, margin:-margin, margin:-margin] = _backgrounds(scenes, noise_seeds, image_size)
    steps = np.round(arrays["centre"] * SUBPIXEL).astype(np.int64)  # (N, K, 2) in 1/SUBPIXEL px
    floors, fractions = np.divmod(steps, SUBPIXEL)
    offsets = np.arange(size)
    for slot in range(max_objects):
        rows_in_batch = np.nonzero(arrays["count"] > slot)[0]
        alpha = masks[
            arrays["shape"][rows_in_batch, slot],
            arrays["size"][rows_in_batch, slot],
            fractions[rows_in_batch, slot, 1],
            fractions[rows_in_batch, slot, 0],
        ][..., None]  # (n, P, P, 1)
        top = floors[rows_in_batch, slot, 1] - size // 2 + margin
        left = floors[rows_in_batch, slot, 0] - size // 2 + margin
        index = (
            rows_in_batch[:, None, None],
            (top[:, None] + offsets)[:, :, None],
            (left[:, None] + offsets)[:, None, :],
        )
        region = canvas[index]
        colour = arrays["colour"][rows_in_batch, slot][:, None, None, :]
        canvas[index] = region + alpha * (colour - region)
    # Blends of values in [0, 255] stay in [0, 255].
    return np.rint(canvas[:, margin:-margin, margin:-margin]).astype(np.uint8)


def render_clips(clips: list[dict], noise_seeds: list[int], image_size: int) -> np.ndarray:
    """Draws clip graphs into uint8[N, F, S, S, 3], frame f placing each object at centres[f]."""
    if not clips:
        return np.zeros((0, 0, image_size, image_size, 3), np.uint8)
    num_frames = len(clips[0]["objects"][0]["centres"])
    frames, seeds = [], []
    for clip, seed in zip(clips, noise_seeds, strict=True):
        for frame in range(num_frames):
            objects = [dict(item, centre=item["centres"][frame]) for item in clip["objects"]]
            frames.append({"background": clip["background"], "objects": objects})
            seeds.append(seed)
    images = render_scenes(frames, seeds, image_size)
    return images.reshape(len(clips), num_frames, image_size, image_size, 3)

"""Does a trained LLaVA read pixels it was not trained on? Shapes drawn by Pillow, and a photograph.

    python bench/shapes_qa.py --workdir runs/quickstart/llava_stage2 [--photo PATH] [--num 200]

Draws single shapes (circle, square, triangle, star) in one of four colours (red, green, blue,
yellow) with Pillow's own rasteriser — not the world's renderer — at random sizes and positions on
plain backgrounds of random image sizes (from 48 to 320 px, not square), asks the model the VQA
prompt of its config around "What color is the {shape}?", and prints the accuracy of the normalised
first answer line against chance (25 %: four colours). With `--photo`, it also answers questions
about a real photograph of any size and reports whether every answer word is in the world's
vocabulary. Uses the public API (`evaluate.load_run`, `generate.answer`).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 60, 220),
    "yellow": (235, 210, 30),
}
BACKGROUNDS = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
    "brown": (120, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "star")


def draw_shape(rng: np.random.Generator) -> tuple[np.ndarray, str, str, str]:
    """A uint8[H, W, 3] image with one shape; (image, shape, colour, background name)."""
    from PIL import Image, ImageDraw

    width, height = (int(v) for v in rng.integers(48, 321, size=2))
    shape, colour = SHAPES[rng.integers(4)], list(COLOURS)[rng.integers(4)]
    background_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    background = BACKGROUNDS[background_name]
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    radius = side * rng.uniform(0.18, 0.35)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill
        )
    else:
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        draw.polygon(points, fill=fill)
    return np.asarray(image), shape, colour, background_name


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", required=True, help="a trained LLaVA workdir (e.g. llava_stage2)"
    )
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--photo", default=None, help="a real photograph (any size, any format)")
    parser.add_argument("--num", type=int, default=200, help="drawn images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from jaxvlm import cache, data, evaluate, generate
    from jaxvlm.data import grammar
    from jaxvlm.evals.vqa import first_line, normalize_answer

    run = evaluate.load_run(args.workdir, cache_dir=cache.resolve(args.cache_dir))
    prompt = run.config.evals.vqa.prompt
    rng = np.random.default_rng(args.seed)
    drawn = [draw_shape(rng) for _ in range(args.num)]
    questions = [prompt.format(question=f"What color is the {d[1]}?") for d in drawn]
    replies = generate.answer(run, questions, [[d[0]] for d in drawn], max_new_tokens=10)
    correct = [
        normalize_answer(first_line(r.text)) == d[2] for r, d in zip(replies, drawn, strict=True)
    ]
    print(
        f"drawn shapes: colour accuracy {100 * np.mean(correct):.1f}% over {args.num} (chance 25%)"
    )
    for label, field in (("colour", 2), ("shape", 1), ("background", 3)):
        groups: dict[str, list[bool]] = {}
        for d, right in zip(drawn, correct, strict=True):
            groups.setdefault(d[field], []).append(right)
        print(
            f"  by {label}: "
            + ", ".join(
                f"{k} {100 * np.mean(v):.0f}% (n={len(v)})" for k, v in sorted(groups.items())
            )
        )
    for (_, shape, colour, background), reply in list(zip(drawn, replies, strict=True))[:5]:
        print(f"  {colour} {shape} on {background} -> {reply.text!r}")

    if args.photo:
        vocabulary = set(data.grammar_words())
        asks = [
            "Describe the image concisely.",
            prompt.format(question="What color is the circle?"),
        ]
        replies = generate.answer(run, asks, [[args.photo]] * len(asks), max_new_tokens=24)
        for ask, reply in zip(asks, replies, strict=True):
            words = grammar.split_words(reply.text)
            unknown = sorted(set(words) - vocabulary)
            print(
                f"photo: {ask!r} -> {reply.text!r} (words outside the world's vocabulary: {unknown})"
            )


if __name__ == "__main__":
    main()

"""The synthetic world: seeded scenes of coloured shapes, their texts, and moving-object clips.

    python -m jaxvlm.data.world --out /tmp/world --seed 0 --held-out "purple star,orange heart"

builds a world into --out and prints one summary line. The world serves all four papers: images
with 5 captions each (captioning, retrieval), VQAv2-style questions with 10 answers (colour,
shape, count, position, existence, relation), LLaVA-Instruct conversations, few-shot episodes,
and clips with direction questions. Held-out colour-shape compositions occur only in
`test_novel`. `builder.py` documents every split's features; this module re-exports the API:

    config = WorldConfig(**config.data.world)
    world = load_world(build_world(config, cache_dir))
    records = world.as_data_source("train")
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxvlm.data.builder import decode_record
from jaxvlm.data.grammar import grammar_words
from jaxvlm.data.storage import World, build_world, load_world, open_world, write_world
from jaxvlm.data.vocabulary import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    NUMBER_WORDS,
    POSITIONS,
    QUESTION_TYPES,
    RELATIONS,
    SHAPES,
    SIZES,
)
from jaxvlm.data.world_config import WorldConfig

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DIRECTIONS",
    "NUMBER_WORDS",
    "POSITIONS",
    "QUESTION_TYPES",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "World",
    "WorldConfig",
    "build_world",
    "decode_record",
    "grammar_words",
    "load_world",
    "main",
    "open_world",
    "write_world",
]


def _parser() -> argparse.ArgumentParser:
    defaults = WorldConfig()
    parser = argparse.ArgumentParser(
        prog="python -m jaxvlm.data.world",
        description="Build a synthetic world (images, captions, VQA, instructions, clips) as a "
        "tensorflow-datasets directory that load_world() and `evaluate --data` read.",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="directory to build the world into"
    )
    parser.add_argument(
        "--seed", type=int, required=True, metavar="S", help="seed of every scene and text"
    )
    parser.add_argument(
        "--held-out",
        metavar="LIST",
        default=",".join(defaults.held_out),
        help='comma-separated "colour shape" compositions seen only in test_novel '
        f'(default "{",".join(defaults.held_out)}"; "" holds nothing out). '
        f"Colours: {', '.join(COLOURS)}. Shapes: {', '.join(SHAPES)}.",
    )
    parser.add_argument(
        "--num-scenes", type=int, metavar="N", default=defaults.num_scenes, help="training scenes"
    )
    parser.add_argument(
        "--num-eval-scenes",
        type=int,
        metavar="N",
        default=defaults.num_eval_scenes,
        help="scenes in each of validation, test and test_novel",
    )
    parser.add_argument(
        "--num-clips", type=int, metavar="N", default=defaults.num_clips, help="training clips"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        metavar="S",
        default=defaults.image_size,
        help="image side in pixels",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Builds the world the flags describe; bad input exits non-zero with one line on stderr."""
    args = _parser().parse_args(argv)
    held_out = tuple(part.strip() for part in args.held_out.split(",") if part.strip())
    try:
        config = WorldConfig(
            seed=args.seed,
            num_scenes=args.num_scenes,
            num_eval_scenes=args.num_eval_scenes,
            num_clips=args.num_clips,
            image_size=args.image_size,
            held_out=held_out,
        )
        start = time.perf_counter()
        world = write_world(config, args.out)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    counts = ", ".join(f"{split} {count}" for split, count in world.splits.items())
    held = ", ".join(world.held_out) or "nothing"
    print(f"world {world.path}: {counts}; held out: {held}; {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

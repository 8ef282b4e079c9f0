"""Does a trained VLM answer from the image? VQA accuracy by question type, with each question
asked about its own image, about another scene's image, and with no image at all.

    python bench/image_use.py --workdir runs/quickstart/llava_stage2 [--split test] [--num 300]

A model that reads pixels loses accuracy when the image is swapped for another scene's (the
answer no longer matches what it sees); a model that answers from language priors scores the same
in all three columns. The questions are those the VQA evaluator asks (`eval_sets.vqa_question_pairs`),
scored with VQAv2's accuracy (answers normalised, 10 references); uses the public API (`evaluate.load_run`,
`generate.answer`).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="a trained VLM workdir")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--num", type=int, default=300, help="questions scored")
    parser.add_argument("--seed", type=int, default=0, help="seeds the swapped images")
    args = parser.parse_args()

    from jaxvlm import cache, data, evaluate, generate
    from jaxvlm.data import eval_sets
    from jaxvlm.evals.vqa import first_line, vqa_accuracy

    cache_dir = cache.resolve(args.cache_dir)
    run = evaluate.load_run(args.workdir, cache_dir=cache_dir)
    world = data.open_world(run.config.data.world, cache_dir)
    scenes = eval_sets.eval_scenes(world, args.split)
    chosen = eval_sets.vqa_question_pairs(scenes, args.num)  # the VQA evaluator's questions
    rng = np.random.default_rng(args.seed)
    questions = [scenes[s]["questions"][q] for s, q in chosen]
    own = [scenes[s]["image"] for s, _ in chosen]
    # Another scene's image for each question (a derangement of the chosen scenes).
    other_scene = [(s + 1 + int(rng.integers(len(scenes) - 1))) % len(scenes) for s, _ in chosen]
    swapped = [scenes[s]["image"] for s in other_scene]
    prompt = run.config.evals.vqa.prompt
    texts = [prompt.format(question=q["question"]) for q in questions]

    columns = {
        "own image": [[image] for image in own],
        "another scene's image": [[image] for image in swapped],
        "no image": [[] for _ in own],
    }
    scores: dict[str, dict[str, list[float]]] = {}
    for column, images in columns.items():
        replies = generate.answer(run, texts, images, max_new_tokens=10)
        by_type = defaultdict(list)
        for question, reply in zip(questions, replies, strict=True):
            accuracy = vqa_accuracy(first_line(reply.text), question["answers"])
            by_type[question["question_type"]].append(accuracy)
            by_type["all"].append(accuracy)
        scores[column] = by_type

    types = ["all", *sorted(t for t in scores["own image"] if t != "all")]
    print(f"{run.workdir} step {run.step}, {args.split}, {len(questions)} questions")
    print("| question type | n | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for kind in types:
        cells = [f"{100 * np.mean(scores[c][kind]):.1f}" for c in columns]
        print(f"| {kind} | {len(scores['own image'][kind])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

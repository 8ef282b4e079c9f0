"""The `EVALUATORS` table and the glue that runs evaluators during and after training.

`config.evals = {name: dict(type=<EVALUATORS key>, split=..., every_steps=N, batch_size=...)}`;
`every_steps=0` evaluates only at the end of training. An evaluator is
`Evaluator(predict_fns, *, data, batch_size)` with `run(params) -> {metric: value}`; it never imports
the model (STYLE.md §10).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from jaxvlm.evals.captioning import cider_d
from jaxvlm.evals.perplexity import PerplexityEvaluator
from jaxvlm.evals.retrieval import RetrievalEvaluator, recall_at_k
from jaxvlm.evals.vqa import mean_vqa_accuracy, normalize_answer, vqa_accuracy

__all__ = [
    "EVALUATORS",
    "PerplexityEvaluator",
    "RetrievalEvaluator",
    "cider_d",
    "mean_vqa_accuracy",
    "normalize_answer",
    "recall_at_k",
    "run_evals",
    "setup_evals",
    "vqa_accuracy",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvaluatorSpec:
    """An evaluator class and how to load its examples from the world."""

    evaluator: type
    load_data: Callable  # (world, split, tokenizer, preprocessing, max_text_len) -> data
    fields: tuple[str, ...] = ("type", "split", "every_steps", "batch_size")


def _retrieval_data(world, split, tokenizer, preprocessing, max_text_len):
    from jaxvlm import data

    return data.retrieval_set(world, split, tokenizer, preprocessing, max_text_len=max_text_len)


def _perplexity_data(world, split, tokenizer, preprocessing, max_text_len):
    from jaxvlm import data

    return data.eval_texts(world, split, tokenizer, max_text_len=max_text_len)


EVALUATORS: dict[str, EvaluatorSpec] = {
    "retrieval": EvaluatorSpec(RetrievalEvaluator, _retrieval_data),
    "perplexity": EvaluatorSpec(PerplexityEvaluator, _perplexity_data),
}


@dataclasses.dataclass
class ScheduledEvaluator:
    name: str
    evaluator: object
    every_steps: int


def setup_evals(config, model, mesh, data) -> list[ScheduledEvaluator]:
    from jaxvlm import predict

    fns = predict.predict_fns(model, mesh)
    scheduled = []
    for name, fields in config.evals.items():
        spec = EVALUATORS[fields.type]  # names and fields checked by config_utils.validate
        examples = spec.load_data(
            data.world, fields.split, data.tokenizer, data.preprocessing, config.data.max_text_len
        )
        batch_size = _round_to_shards(fields.batch_size, mesh)
        evaluator = spec.evaluator(fns, data=examples, batch_size=batch_size)
        scheduled.append(ScheduledEvaluator(name, evaluator, fields.every_steps))
    return scheduled


def _round_to_shards(batch_size: int, mesh) -> int:
    """Eval batches must split evenly over the mesh's batch axes."""
    from jaxvlm import sharding

    shards = sharding.num_batch_shards(mesh)
    return -(-batch_size // shards) * shards


def run_evals(
    evaluators, params, step: int, writer, *, final_step: int | None = None, force: bool = False
) -> dict[str, dict[str, float]]:
    """Runs the evaluators due at `step` (every one at `final_step` or when forced)."""
    results = {}
    for item in evaluators:
        due = force or step == final_step or (item.every_steps and step % item.every_steps == 0)
        if not due:
            continue
        metrics = item.evaluator.run(params)
        results[item.name] = metrics
        writer.write(step, {f"eval/{item.name}/{k}": v for k, v in metrics.items()})
    return results

"""The `EVALUATORS` table and the glue that runs evaluators during and after training.

`config.evals = {name: dict(type=<EVALUATORS key>, split=..., every_steps=N, batch_size=..., ...)}`;
`every_steps=0` evaluates only at the end of training. An evaluator is built from the model's
predict fns and its examples and has `run(params) -> {metric: value}`; it never imports the model
(STYLE.md §10). Generative evaluators (`vqa`, `captioning`) also run blind (INTERFACES.md §3):
`setup_evals(..., blind=True)` builds them over prompts without the image.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

from jaxvlm.evals.captioning import cider_d
from jaxvlm.evals.generative import GenerativeEvaluator, score_captions, score_vqa
from jaxvlm.evals.perplexity import PerplexityEvaluator
from jaxvlm.evals.retrieval import RetrievalEvaluator, recall_at_k
from jaxvlm.evals.vqa import mean_vqa_accuracy, normalize_answer, vqa_accuracy

__all__ = [
    "EVALUATORS",
    "GenerativeEvaluator",
    "PerplexityEvaluator",
    "RetrievalEvaluator",
    "cider_d",
    "has_generative",
    "mean_vqa_accuracy",
    "normalize_answer",
    "recall_at_k",
    "run_evals",
    "setup_evals",
    "vqa_accuracy",
]

logger = logging.getLogger(__name__)

COMMON_FIELDS = ("type", "split", "every_steps", "batch_size")
GENERATIVE_FIELDS = (
    *COMMON_FIELDS,
    "num_examples",
    "prompt",
    "max_new_tokens",
    "num_beams",  # 1: greedy; K > 1: beam search (BLIP-2's zero-shot VQA: 5)
    "length_penalty",  # beam search's α (BLIP-2: -1, favouring short answers)
)

RETRIEVAL_FIELDS = (
    *COMMON_FIELDS,
    "rerank",  # "none" (ITC / CLIP similarity), "itm" (BLIP-2 §4.4) or "itm_itc" (LAVIS)
    "rerank_k",  # candidates re-scored per image and per text (BLIP-2: 128)
)


@dataclasses.dataclass(frozen=True)
class EvaluatorSpec:
    """How to build an evaluator: `build(predict_fns, context, fields, batch_size, blind)`, where
    `context` holds the world, tokenizer, preprocessing and config; its config fields; and whether
    it generates text (and so has a blind baseline)."""

    build: Callable
    fields: tuple[str, ...] = COMMON_FIELDS
    generative: bool = False


def _retrieval(fns, context, fields, batch_size, blind):
    from jaxvlm import data

    examples = data.retrieval_set(
        context.world,
        fields.split,
        context.tokenizer,
        context.preprocessing,
        max_text_len=context.config.data.max_text_len,
    )
    return RetrievalEvaluator(
        fns, data=examples, batch_size=batch_size, rerank=fields.rerank, rerank_k=fields.rerank_k
    )


def _perplexity(fns, context, fields, batch_size, blind):
    from jaxvlm import data, models

    examples = data.eval_texts(
        context.world,
        fields.split,
        context.tokenizer,
        max_text_len=context.config.data.max_text_len,
    )
    split = models.encoder_decoder_split(context.config, context.tokenizer, mode="half")
    if split is not None:  # "half" draws nothing: any generator gives the same split
        examples = examples.map(lambda example: split.random_map(example, None))
    return PerplexityEvaluator(fns, data=examples, batch_size=batch_size)


def _generative(load_prompts: str, score: Callable, fns, context, fields, batch_size, blind):
    from jaxvlm import data, vlm
    from jaxvlm.decoding import Decoding

    fmt = vlm.conversation_format(context.config, context.tokenizer)
    prompts = getattr(data, load_prompts)(
        context.world,
        fields.split,
        fmt,
        context.preprocessing,
        prompt=fields.prompt,
        num_examples=fields.num_examples,
        blind=blind,
    )
    return GenerativeEvaluator(
        fns,
        data=prompts,
        batch_size=batch_size,
        tokenizer=context.tokenizer,
        stop=fmt.template.stop,
        max_new_tokens=fields.max_new_tokens,
        score=score,
        decoding=Decoding(num_beams=fields.num_beams, length_penalty=fields.length_penalty),
    )


EVALUATORS: dict[str, EvaluatorSpec] = {
    "retrieval": EvaluatorSpec(_retrieval, RETRIEVAL_FIELDS),
    "perplexity": EvaluatorSpec(_perplexity),
    "vqa": EvaluatorSpec(
        functools.partial(_generative, "vqa_prompts", score_vqa), GENERATIVE_FIELDS, True
    ),
    "captioning": EvaluatorSpec(
        functools.partial(_generative, "caption_prompts", score_captions), GENERATIVE_FIELDS, True
    ),
}


@dataclasses.dataclass
class ScheduledEvaluator:
    name: str
    evaluator: object
    every_steps: int


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What evaluators read besides the model: the world, tokenizer, preprocessing, config."""

    world: object
    tokenizer: object
    preprocessing: object
    config: object


def setup_evals(config, model, mesh, data, *, blind: bool = False) -> list[ScheduledEvaluator]:
    """The evaluators of `config.evals` (only the generative ones, over image-free prompts, when
    `blind`)."""
    from jaxvlm import predict

    fns = predict.predict_fns(model, mesh)
    context = EvalContext(data.world, data.tokenizer, data.preprocessing, config)
    scheduled = []
    for name, fields in config.evals.items():
        spec = EVALUATORS[fields.type]  # names and fields checked by config_utils.validate
        if blind and not spec.generative:
            continue
        batch_size = _round_to_shards(fields.batch_size, mesh)
        evaluator = spec.build(fns, context, fields, batch_size, blind)
        scheduled.append(ScheduledEvaluator(name, evaluator, fields.every_steps))
    return scheduled


def has_generative(config) -> bool:
    return any(EVALUATORS[fields.type].generative for fields in config.evals.values())


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

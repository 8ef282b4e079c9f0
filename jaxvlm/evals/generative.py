"""Generative evaluators: VQA accuracy and captioning CIDEr-D on greedy or beam generations.

Each runs the `generate` predict fn over every prompt of a `PromptSet` exactly once (the last
batch padded and masked), turns each generation into text with `data.chat.decode_answer` (cut at
EOS or the template's stop string), and scores it against the references on the host. The blind
baseline (INTERFACES.md §3) is the same evaluator over prompts built with `blind=True`, run with
the frozen LLM's parameters.
"""

from __future__ import annotations

import numpy as np

from jaxvlm.evals.captioning import cider_d
from jaxvlm.evals.vqa import first_line, mean_vqa_accuracy


class GenerativeEvaluator:
    """Generates for every prompt of `data` and scores the texts (`score` in subclasses).

    Args:
      predict_fns: needs "generate": `fn(params, batch, *, max_new_tokens, eos_id, pad_id,
        stop_ids) -> int32[B, max_new_tokens]`.
      data: a `jaxvlm.data.PromptSet`.
      batch_size: prompts per generate call.
      tokenizer: decodes the generated ids.
      stop: the template's stop string (generation ends on its ids, or on EOS).
      max_new_tokens: generation budget per prompt.
      score: (predictions, references) -> {metric: value}.
      decoding: a `jaxvlm.decoding.Decoding` (default greedy; BLIP-2: beam 5, α = -1).
    """

    def __init__(
        self,
        predict_fns,
        *,
        data,
        batch_size: int,
        tokenizer,
        stop: str,
        max_new_tokens,
        score,
        decoding=None,
    ):
        from jaxvlm.data import chat
        from jaxvlm.decoding import Decoding

        self.decoding = decoding or Decoding()
        self.score = score
        self.generate = predict_fns["generate"]
        self.data, self.batch_size = data, batch_size
        self.tokenizer = tokenizer
        self.stop = stop
        self.stop_ids = chat.encode_stop(tokenizer, stop)
        self.max_new_tokens = max_new_tokens

    def predictions(self, params) -> list[str]:
        """The decoded answer to every prompt, in order."""
        from jaxvlm.data import batches, chat

        texts = []
        pad_id = self.tokenizer.pad_id or 0
        for batch in batches(self.data.prompts, self.batch_size):
            valid = batch.pop("valid")
            batch.pop("index")
            tokens = self.generate(
                params,
                batch,
                max_new_tokens=self.max_new_tokens,
                eos_id=self.tokenizer.eos_id,
                pad_id=pad_id,
                stop_ids=self.stop_ids,
                decoding=self.decoding,
            )
            texts += [
                chat.decode_answer(self.tokenizer, row, self.stop)
                for row in np.asarray(tokens)[valid]
            ]
        return texts

    def run(self, params) -> dict[str, float]:
        predictions = self.predictions(params)
        if len(predictions) != len(self.data.references):
            raise RuntimeError(
                f"{len(predictions)} predictions for {len(self.data.references)} examples"
            )
        return self.score(predictions, self.data.references)


def score_vqa(predictions, references) -> dict[str, float]:
    """VQAv2 accuracy (0–100) of each answer's first line against the 10 human answers."""
    return {"vqa_accuracy": mean_vqa_accuracy([first_line(t) for t in predictions], references)}


def score_captions(predictions, references) -> dict[str, float]:
    """CIDEr-D ×100 (as papers report it) against every reference caption of each image."""
    return {"cider": 100.0 * cider_d(predictions, references)}

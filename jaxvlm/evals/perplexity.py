"""Perplexity of a language model on held-out text: exp(total token NLL / number of target tokens).

The device computes per-example sums (the `score` predict fn); the host adds them up (flax lm1b).
"""

from __future__ import annotations

import numpy as np


class PerplexityEvaluator:
    """`data`: a source of {"tokens", "mask", "loss_mask"} examples (`jaxvlm.data.eval_texts`)."""

    def __init__(self, predict_fns, *, data, batch_size: int):
        self.score = predict_fns["score"]
        self.data, self.batch_size = data, batch_size

    def run(self, params) -> dict[str, float]:
        from jaxvlm.data import batches

        sums = np.zeros(2, np.float64)
        for batch in batches(self.data, self.batch_size):
            valid = batch.pop("valid")
            batch.pop("index")
            sums += np.asarray(self.score(params, batch), np.float64)[valid].sum(axis=0)
        return {"perplexity": float(np.exp(sums[0] / max(sums[1], 1.0)))}

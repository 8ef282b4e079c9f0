"""Perplexity of a language model on held-out text: exp(total token NLL / number of target tokens).

The device computes per-example sums (the `score` predict fn); the host adds them up (flax lm1b).
"""

from __future__ import annotations

import numpy as np

# Batches are cut to their longest row rounded up to a multiple of this: right padding past every
# row's end changes no score (causal attention, zero loss mask), and few lengths mean few compiles.
LENGTH_BUCKET = 32


DECODER_KEYS = ("decoder_tokens", "decoder_mask", "loss_mask")


def _trimmed_length(mask, bucket: int) -> int:
    longest = int(np.asarray(mask).sum(axis=1).max())
    return min(mask.shape[1], max(bucket, -(-longest // bucket) * bucket))


def trim_padding(batch: dict, bucket: int = LENGTH_BUCKET) -> dict:
    """The [B, T] arrays of a right-padded batch cut to its longest row rounded up to `bucket`;
    an encoder-decoder batch's decoder arrays ([B, Td]) by the longest decoder row."""
    length = _trimmed_length(batch["mask"], bucket)
    if "decoder_mask" not in batch:
        return {key: value[:, :length] for key, value in batch.items()}
    decoder_length = _trimmed_length(batch["decoder_mask"], bucket)
    return {
        key: value[:, : decoder_length if key in DECODER_KEYS else length]
        for key, value in batch.items()
        if value.ndim == 2
    }


class PerplexityEvaluator:
    """`data`: a source of right-padded {"tokens", "mask", "loss_mask"} examples
    (`jaxvlm.data.eval_texts`, ordered by length so that batches trim well); for an
    encoder-decoder, split by `models.encoder_decoder_split(..., mode="half")` (the perplexity
    of each text's second half given its first)."""

    def __init__(self, predict_fns, *, data, batch_size: int):
        self.score = predict_fns["score"]
        self.data, self.batch_size = data, batch_size

    def run(self, params) -> dict[str, float]:
        from jaxvlm.data import batches

        sums = np.zeros(2, np.float64)
        for batch in batches(self.data, self.batch_size):
            valid = batch.pop("valid")
            batch.pop("index")
            scores = self.score(params, trim_padding(batch))
            sums += np.asarray(scores, np.float64)[valid].sum(axis=0)
        return {"perplexity": float(np.exp(sums[0] / max(sums[1], 1.0)))}

"""Evaluators against hand-computed values; exactly N examples whatever the batch size."""

from types import SimpleNamespace

import numpy as np
import pytest

from jaxvlm.evals import PerplexityEvaluator, RetrievalEvaluator, recall_at_k


def test_recall_at_k_by_hand():
    # 3 images; texts 0,1 → image 0, text 2 → image 1, text 3 → image 2.
    similarity = np.array(
        [
            [0.9, 0.1, 0.0, 0.2],  # image 0: best text 0 (its own) → rank 0
            [0.8, 0.1, 0.3, 0.0],  # image 1: order 0, 2, 1, 3 → its text 2 at rank 1
            [0.1, 0.9, 0.8, 0.2],  # image 2: order 1, 2, 3, 0 → its text 3 at rank 2
        ]
    )
    metrics = recall_at_k(similarity, np.array([0, 0, 1, 2]), ks=(1, 2, 3))
    assert metrics["r1_image_to_text"] == pytest.approx(100 / 3)
    assert metrics["r2_image_to_text"] == pytest.approx(200 / 3)
    assert metrics["r3_image_to_text"] == pytest.approx(100.0)
    # text→image ranks: t0 [i0,i1,i2] → 0; t1 [i2,i0,i1] → 1; t2 [i2,i1,i0] → 1; t3 [i0,i2,i1] → 1
    assert metrics["r1_text_to_image"] == pytest.approx(25.0)
    assert metrics["r2_text_to_image"] == pytest.approx(100.0)


def test_retrieval_evaluator_scores_every_example_once():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(5, 3))
    data = SimpleNamespace(
        images=[{"image": e} for e in embeddings],
        texts=[{"text_tokens": e, "text_mask": np.ones(3)} for e in embeddings],
        text_to_image=np.arange(5),
    )
    identity = lambda params, batch: batch.get("image", batch.get("text_tokens"))
    evaluator = RetrievalEvaluator(
        {"embed_image": identity, "embed_text": identity}, data=data, batch_size=2
    )
    expected = recall_at_k(embeddings @ embeddings.T, np.arange(5))
    assert evaluator.run(None) == expected


def test_perplexity_by_hand_with_a_padded_last_batch():
    # Per-example (summed NLL, target tokens) fixed by the example's index; 3 examples, batches of 2.
    data = [
        {"tokens": np.full(4, i), "mask": np.ones(4, int), "loss_mask": np.ones(4, int)}
        for i in range(3)
    ]
    scores = np.array([[3.0, 2.0], [1.0, 2.0], [2.0, 1.0]])
    score = lambda params, batch: scores[batch["tokens"][:, 0]]
    result = PerplexityEvaluator({"score": score}, data=data, batch_size=2).run(None)
    assert result["perplexity"] == pytest.approx(np.exp(6.0 / 5.0))

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


def test_perplexity_batches_are_cut_to_their_longest_row():
    """Right padding past every row's end is dropped (rounded up to the bucket), nothing else."""
    from jaxvlm.evals.perplexity import trim_padding

    mask = np.zeros((2, 96), np.int32)
    mask[0, :5], mask[1, :40] = 1, 1
    batch = {"tokens": np.arange(192).reshape(2, 96), "mask": mask, "loss_mask": mask}
    trimmed = trim_padding(batch, bucket=32)
    assert all(value.shape == (2, 64) for value in trimmed.values())
    np.testing.assert_array_equal(trimmed["tokens"], batch["tokens"][:, :64])
    assert trim_padding({k: v[:, :50] for k, v in batch.items()}, bucket=32)["mask"].shape == (
        2,
        50,
    )


def test_trimming_keeps_a_real_lm_score(tiny_config):
    """The per-example NLL sums of a Llama LM on right-padded rows are the same cut short."""
    import flax.linen as nn
    import jax

    from jaxvlm import models, sharding
    from jaxvlm.evals.perplexity import trim_padding
    from jaxvlm.predict import predict_fns

    config = tiny_config("backbones_pretrain", model="lm")
    model = models.build_model(config)
    params = nn.unbox(models.init_fn(model, config)(jax.random.key(0)))
    score = predict_fns(model, sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))["score"]
    mask = np.zeros((8, 96), np.int32)
    for row, length in enumerate((5, 17, 40, 2, 33, 9, 12, 30)):
        mask[row, :length] = 1
    tokens = np.where(mask, np.arange(96)[None] % 50 + 5, 0).astype(np.int32)
    loss_mask = mask.copy()
    loss_mask[:, 0] = 0
    batch = {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}
    trimmed = trim_padding(batch)
    assert trimmed["tokens"].shape == (8, 64)
    np.testing.assert_allclose(
        np.asarray(score(params, trimmed)), np.asarray(score(params, batch)), rtol=1e-5, atol=1e-5
    )


# ITC similarity of 4 images × 4 texts (text j belongs to image j): image 0's text ranks 3rd,
# image 1's 4th; text 0's image ranks 2nd, text 1's 4th.
ITC = np.array(
    [
        [0.5, 0.9, 0.8, 0.1],
        [0.9, 0.1, 0.8, 0.7],
        [0.1, 0.2, 0.9, 0.3],
        [0.2, 0.3, 0.1, 0.9],
    ]
)


def _rerank_evaluator(rerank, rerank_k, match=lambda i, j: float(i == j)):
    scored = []

    def match_score(params, batch):
        pairs = zip(batch["image_features"][:, 0], batch["text_tokens"][:, 0], strict=True)
        pairs = [(int(i), int(j)) for i, j in pairs]
        scored.extend(pairs)
        return np.array([match(i, j) for i, j in pairs], np.float32)

    fns = {
        "embed_image": lambda params, batch: ITC[batch["image"][:, 0].astype(int)],
        "embed_text": lambda params, batch: np.eye(4)[batch["text_tokens"][:, 0].astype(int)],
        "image_features": lambda params, batch: batch["image"],
        "match_score": match_score,
    }
    data = SimpleNamespace(
        images=[{"image": np.array([i], np.float32)} for i in range(4)],
        texts=[{"text_tokens": np.array([j]), "text_mask": np.ones(1)} for j in range(4)],
        text_to_image=np.arange(4),
    )
    evaluator = RetrievalEvaluator(fns, data=data, batch_size=3, rerank=rerank, rerank_k=rerank_k)
    return evaluator, scored


def test_itm_reranks_the_top_k_itc_candidates_by_hand():
    ks = (1, 2, 3, 4)
    itc = recall_at_k(ITC, np.arange(4), ks)
    assert itc["r1_image_to_text"] == itc["r1_text_to_image"] == 50.0
    evaluator, scored = _rerank_evaluator("itm", 3)
    metrics = evaluator.run(None)
    # Image 0's text (3rd) and text 0's image (2nd) rise to 1st; image 1's and text 1's, outside
    # the top 3, stay out.
    assert metrics["r1_image_to_text"] == metrics["r1_text_to_image"] == 75.0
    assert metrics["r10_image_to_text"] == 100.0
    image_scores, text_scores = evaluator.rerank_scores(None, ITC)
    assert np.argsort(-image_scores[1]).tolist()[-1] == 1  # below every re-scored candidate
    # Every candidate pair of either direction is scored exactly once.
    top = {(i, int(j)) for i in range(4) for j in np.argsort(-ITC[i])[:3]}
    top |= {(int(i), j) for j in range(4) for i in np.argsort(-ITC[:, j])[:3]}
    assert len(scored) == 2 * len(top) and set(scored) == top  # run() and rerank_scores()


def test_rerank_outside_the_top_k_keeps_the_itc_order():
    metrics, _ = _rerank_evaluator("itm", 1)
    assert metrics.run(None) == recall_at_k(ITC, np.arange(4))
    # ITM + ITC with an uninformative ITM head is the ITC ranking.
    flat, _ = _rerank_evaluator("itm_itc", 4, match=lambda i, j: 0.0)
    assert flat.run(None) == recall_at_k(ITC, np.arange(4))


def test_rerank_needs_a_matching_head():
    data = SimpleNamespace(images=[], texts=[], text_to_image=np.arange(0))
    fns = {"embed_image": None, "embed_text": None}
    with pytest.raises(ValueError, match=r"needs an image-text matching head.*match_score"):
        RetrievalEvaluator(fns, data=data, batch_size=2, rerank="itm")
    with pytest.raises(ValueError, match="rerank='itc'; allowed: none, itm, itm_itc"):
        RetrievalEvaluator(fns, data=data, batch_size=2, rerank="itc")

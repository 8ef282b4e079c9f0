"""Image–text retrieval R@K in both directions (CLIP / BLIP-2 protocol, as on COCO).

Every image has one or more reference captions. Image→text: an image scores a hit at K when any of its
captions is among the K texts most similar to it. Text→image: a caption scores a hit when its image is
among the K most similar images. Reported on a 0–100 scale.

Re-ranking (BLIP-2 §4.4, LAVIS `compute_sim_matrix`): the k most ITC-similar candidates of each
image (texts) and of each text (images) are scored again by the model's ITM head ("itm": its
matched logit; "itm_itc": that logit + the ITC similarity, as LAVIS ranks) and ranked by that score,
ahead of every other candidate (which keep their ITC order behind them).
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)
RERANKS = ("none", "itm", "itm_itc")


def recall_at_k(
    similarity: np.ndarray,
    text_to_image: np.ndarray,
    ks=KS,
    *,
    text_similarity: np.ndarray | None = None,
) -> dict[str, float]:
    """`similarity float[I, T]`, `text_to_image int[T]` (the image of each text) → R@K metrics.

    `text_similarity float[T, I]`: the text→image scores when they differ from `similarity.T`
    (re-ranking scores each direction's own candidates)."""
    num_images = similarity.shape[0]
    # Rank of the best-ranked correct text for each image.
    order = np.argsort(-similarity, axis=1, kind="stable")
    correct = text_to_image[order] == np.arange(num_images)[:, None]
    image_rank = np.argmax(correct, axis=1)
    # Rank of the correct image for each text.
    scores = similarity.T if text_similarity is None else text_similarity
    text_order = np.argsort(-scores, axis=1, kind="stable")
    text_rank = np.argmax(text_order == text_to_image[:, None], axis=1)
    metrics = {}
    for k in ks:
        metrics[f"r{k}_image_to_text"] = 100.0 * float(np.mean(image_rank < k))
        metrics[f"r{k}_text_to_image"] = 100.0 * float(np.mean(text_rank < k))
    return metrics


class RetrievalEvaluator:
    """Embeds every image and caption of a split with the model's `embed_image` / `embed_text`,
    and with `rerank` re-scores each one's `rerank_k` best candidates by the ITM head.

    `data`: a `jaxvlm.data.RetrievalSet` (sources `images`, `texts` and the array `text_to_image`).
    `rerank`: one of RERANKS; anything but "none" needs the predict fns "image_features"
    (`{"image"}` → the bridge's input float[B, P, Dv]) and "match_score" (`{"image_features",
    "text_tokens", "text_mask"}` → the ITM matched logit float[B]).
    """

    def __init__(
        self, predict_fns, *, data, batch_size: int, rerank: str = "none", rerank_k: int = 128
    ):
        if rerank not in RERANKS:
            raise ValueError(f"rerank={rerank!r}; allowed: {', '.join(RERANKS)}")
        if rerank != "none":
            missing = {"image_features", "match_score"} - set(predict_fns)
            if missing:
                raise ValueError(
                    f"rerank={rerank!r} needs an image-text matching head; this model has no "
                    f"{sorted(missing)} (only BLIP-2's Q-Former has one)"
                )
            if rerank_k < 1:
                raise ValueError(f"rerank_k={rerank_k} must be >= 1")
        self.fns = predict_fns
        self.data, self.batch_size = data, batch_size
        self.rerank, self.rerank_k = rerank, rerank_k

    def run(self, params) -> dict[str, float]:
        images = embed_all(self.fns["embed_image"], params, self.data.images, self.batch_size)
        texts = embed_all(self.fns["embed_text"], params, self.data.texts, self.batch_size)
        itc = similarity(images, texts)
        text_to_image = np.asarray(self.data.text_to_image)
        if self.rerank == "none":
            return recall_at_k(itc, text_to_image)
        image_scores, text_scores = self.rerank_scores(params, itc)
        return recall_at_k(image_scores, text_to_image, text_similarity=text_scores)

    def rerank_scores(self, params, itc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ITC `float[I, J]` → (image→text float[I, J], text→image float[J, I]) scores: each row's
        top-k candidates rescored by ITM, above every other candidate."""
        import grain

        top_texts = top_k(itc, self.rerank_k)  # int[I, k]
        top_images = top_k(itc.T, self.rerank_k)  # int[J, k]
        pairs = np.unique(
            np.concatenate(
                [
                    np.stack(
                        [
                            np.repeat(np.arange(len(top_texts)), top_texts.shape[1]),
                            top_texts.ravel(),
                        ],
                        axis=1,
                    ),
                    np.stack(
                        [
                            top_images.ravel(),
                            np.repeat(np.arange(len(top_images)), top_images.shape[1]),
                        ],
                        axis=1,
                    ),
                ]
            ),
            axis=0,
        )
        features = embed_all(self.fns["image_features"], params, self.data.images, self.batch_size)
        texts = [self.data.texts[j] for j in range(len(self.data.texts))]

        def pair_example(pair):
            image, text = int(pair[0]), int(pair[1])
            return {"image_features": features[image], **texts[text]}

        source = grain.MapDataset.source(list(pairs)).map(pair_example)
        matched = embed_all(self.fns["match_score"], params, source, self.batch_size)
        scores = matched + itc[pairs[:, 0], pairs[:, 1]] if self.rerank == "itm_itc" else matched
        # Candidates outside the top-k keep their ITC order, below every re-scored one.
        floor = scores.min() - 1.0 - itc.max()
        image_scores, text_scores = floor + itc, floor + itc.T
        by_pair = dict(zip(map(tuple, pairs.tolist()), scores.tolist(), strict=True))
        for image, row in enumerate(top_texts):
            image_scores[image, row] = [by_pair[image, int(j)] for j in row]
        for text, row in enumerate(top_images):
            text_scores[text, row] = [by_pair[int(i), text] for i in row]
        return image_scores, text_scores


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The indices of each row's min(k, columns) largest scores, best first: int[R, k]."""
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def similarity(images: np.ndarray, texts: np.ndarray, chunk: int = 64) -> np.ndarray:
    """`float[I, E]` or `float[I, Q, E]` (BLIP-2: one embedding per query) against `float[J, E]`
    → `float[I, J]`; with queries, the max over them (BLIP-2 ITC), `chunk` images at a time."""
    if images.ndim == 2:
        return images @ texts.T
    return np.concatenate(
        [
            np.max(np.einsum("iqe,je->iqj", images[start : start + chunk], texts), axis=1)
            for start in range(0, images.shape[0], chunk)
        ]
    )


def embed_all(fn, params, source, batch_size: int) -> np.ndarray:
    """`fn` over every example of `source`, in order, exactly once: `float[N, E]`."""
    from jaxvlm.data import batches

    outputs = []
    for batch in batches(source, batch_size):
        valid = batch.pop("valid")
        batch.pop("index")
        outputs.append(np.asarray(fn(params, batch))[valid])
    return np.concatenate(outputs, axis=0).astype(np.float32)

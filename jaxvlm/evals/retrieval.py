"""Image–text retrieval R@K in both directions (CLIP / BLIP-2 protocol, as on COCO).

Every image has one or more reference captions. Image→text: an image scores a hit at K when any of its
captions is among the K texts most similar to it. Text→image: a caption scores a hit when its image is
among the K most similar images. Reported on a 0–100 scale.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def recall_at_k(similarity: np.ndarray, text_to_image: np.ndarray, ks=KS) -> dict[str, float]:
    """`similarity float[I, T]`, `text_to_image int[T]` (the image of each text) → R@K metrics."""
    num_images = similarity.shape[0]
    # Rank of the best-ranked correct text for each image.
    order = np.argsort(-similarity, axis=1, kind="stable")
    correct = text_to_image[order] == np.arange(num_images)[:, None]
    image_rank = np.argmax(correct, axis=1)
    # Rank of the correct image for each text.
    text_order = np.argsort(-similarity.T, axis=1, kind="stable")
    text_rank = np.argmax(text_order == text_to_image[:, None], axis=1)
    metrics = {}
    for k in ks:
        metrics[f"r{k}_image_to_text"] = 100.0 * float(np.mean(image_rank < k))
        metrics[f"r{k}_text_to_image"] = 100.0 * float(np.mean(text_rank < k))
    return metrics


class RetrievalEvaluator:
    """Embeds every image and caption of a split with the model's `embed_image` / `embed_text`.

    `data`: a `jaxvlm.data.RetrievalSet` (sources `images`, `texts` and the array `text_to_image`).
    """

    def __init__(self, predict_fns, *, data, batch_size: int):
        self.embed_image = predict_fns["embed_image"]
        self.embed_text = predict_fns["embed_text"]
        self.data, self.batch_size = data, batch_size

    def run(self, params) -> dict[str, float]:
        images = embed_all(self.embed_image, params, self.data.images, self.batch_size)
        texts = embed_all(self.embed_text, params, self.data.texts, self.batch_size)
        return recall_at_k(images @ texts.T, np.asarray(self.data.text_to_image))


def embed_all(fn, params, source, batch_size: int) -> np.ndarray:
    """`fn` over every example of `source`, in order, exactly once: `float[N, E]`."""
    from jaxvlm.data import batches

    outputs = []
    for batch in batches(source, batch_size):
        valid = batch.pop("valid")
        batch.pop("index")
        outputs.append(np.asarray(fn(params, batch))[valid])
    return np.concatenate(outputs, axis=0).astype(np.float32)

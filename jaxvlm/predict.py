"""Named predict functions for evaluators: they see these, never the model.

`predict_fns(model, mesh)` returns the subset of `{"logits", "score", "embed_image", "embed_text",
"generate"}` the model supports (`score`: per-example summed next-token NLL and target count), each
`fn(params, batch) -> array`, jitted once with batch-sharded inputs. `generate` (a VLM or an LM) is
`fn(params, batch, *, max_new_tokens, eos_id, pad_id, stop_ids=(), decoding=Decoding(), seed=0,
example_indices=None) -> int32[B, max_new_tokens]`, the tokens of `generate_fn`, the one decode
path that `generate.answer` uses too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvlm import models, objectives, sharding, vlm
from jaxvlm.decoding import Decoding, GenerateOutput, generate, llm_decoder
from jaxvlm.llms.t5 import T5, t5_generate


def _fetch(output):
    if not output.is_fully_addressable:  # multi-process: every process gets the whole result
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(output, tiled=True)
    return jax.device_get(output)


def _jit(fn, mesh, *, fetch: bool = True):
    def traced(params, batch):
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            return fn(params, batch)

    jitted = jax.jit(traced)

    def call(params, batch):
        batch = {
            k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()
        }
        with jax.set_mesh(mesh):
            output = jitted(params, batch)
        return _fetch(output) if fetch else output

    return call


def _sequence_nll(model, params, batch):
    """Per-example `[nll summed over target tokens, number of target tokens]`, `float[B, 2]`
    (an encoder-decoder's over its decoder tokens)."""
    decoder = {k: batch[k] for k in ("decoder_tokens", "decoder_mask") if k in batch}
    logits = model.apply({"params": params}, batch["tokens"], mask=batch["mask"], **decoder).logits
    sequence = batch.get("decoder_tokens", batch["tokens"])
    targets, weights = objectives.next_token_targets(sequence, batch["loss_mask"])
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.stack([jnp.sum(nll * weights, axis=-1), jnp.sum(weights, axis=-1)], axis=-1)


@functools.cache
def generate_fn(model: nn.Module, mesh) -> Callable:
    """The one batched decode path of a text-generating model (a prefix `VLM`, a
    `LanguageModel` or a `Seq2SeqLanguageModel`), used by the generative evaluators and by
    `generate.answer`; an encoder-decoder LLM (T5) decodes through `t5.t5_generate`.

    Returns `fn(params, batch, *, max_new_tokens, eos_id, pad_id, stop_ids=(),
    decoding=None, seed=0, example_indices=None) -> GenerateOutput` (numpy, on the host):
      batch: "tokens", "mask" int[B, T] — left-padded prompts; for a VLM also "images"
        float32[B, M, S, S, 3], "image_mask" bool[B, M] and, for a prompt-reading bridge,
        "bridge_ids"/"bridge_mask" int[B, Tq] (other keys are ignored). B must be
        a multiple of the mesh's batch shards.
      the keywords are those of `jaxvlm.decoding.generate`; `example_indices` int[B] (default
        arange(B)) key the sampling per example, so batching does not change samples.
    A VLM's prompt embeddings (image tokens scattered into their slots) are computed once, then
    the LLM decodes from them with its KV cache. Cached per (model, mesh): one set of programs.
    """
    if isinstance(model, vlm.VLM):
        embed = _jit(
            lambda params, batch: model.apply(
                {"params": params}, **batch, method=vlm.VLM.embed_inputs
            ),
            mesh,
            fetch=False,
        )

        def prompt_inputs(params, batch):
            keys = ("tokens", "images", "image_mask", "bridge_ids", "bridge_mask")
            return None, embed(params, {key: batch[key] for key in keys if key in batch})

    elif isinstance(model, (models.LanguageModel, models.Seq2SeqLanguageModel)):

        def prompt_inputs(params, batch):
            return jax.device_put(batch["tokens"], sharding.batch_sharding(mesh, 2)), None

    else:
        raise ValueError(
            f"{type(model).__name__} does not generate text; only a VLM or a language model does"
        )
    if isinstance(model.llm, T5):
        # An encoder-decoder: the prompt (a VLM's with its image tokens) is the encoder's input,
        # padded on either side; the decoder starts from the pad id (HF T5's
        # `decoder_start_token_id`), which is not in the output.
        llm = model.llm

        def decode(params, tokens, mask, embeddings, *, pad_id, **kwargs):
            return t5_generate(
                llm,
                params,
                tokens,
                mask,
                embeddings=embeddings,
                pad_id=pad_id,
                decoder_start_id=pad_id,
                **kwargs,
            )

    else:
        decoder = llm_decoder(model.llm, "llm")

        def decode(params, tokens, mask, embeddings, **kwargs):
            return generate(decoder, params, tokens, mask, prompt_embeddings=embeddings, **kwargs)

    def fn(
        params,
        batch,
        *,
        max_new_tokens: int,
        eos_id: int | None,
        pad_id: int,
        stop_ids: tuple[int, ...] = (),
        decoding: Decoding | None = None,
        seed: int = 0,
        example_indices=None,
    ) -> GenerateOutput:
        prompt_tokens, prompt_embeddings = prompt_inputs(params, batch)
        mask = jax.device_put(batch["mask"], sharding.batch_sharding(mesh, 2))
        with jax.set_mesh(mesh):
            output = decode(
                params,
                prompt_tokens,
                mask,
                prompt_embeddings,
                max_new_tokens=max_new_tokens,
                eos_id=eos_id,
                pad_id=pad_id,
                stop_ids=stop_ids,
                decoding=decoding or Decoding(),
                seed=seed,
                example_indices=example_indices,
            )
        return jax.tree.map(_fetch, output)

    return fn


def _generated_tokens(model, mesh) -> Callable:
    """The evaluators' "generate": `generate_fn` returning only the tokens, int32[B, N]."""
    decode = generate_fn(model, mesh)
    return lambda params, batch, **kwargs: decode(params, batch, **kwargs).tokens


def predict_fns(model: nn.Module, mesh) -> dict[str, Callable]:
    fns: dict[str, Callable] = {}
    if isinstance(model, models.LanguageModel):
        fns["logits"] = lambda params, batch: (
            model.apply({"params": params}, batch["tokens"], mask=batch["mask"]).logits
        )
    if isinstance(model, (models.LanguageModel, models.Seq2SeqLanguageModel)):
        fns["score"] = lambda params, batch: _sequence_nll(model, params, batch)
    if isinstance(model, models.DualEncoder):
        fns["embed_image"] = lambda params, batch: model.apply(
            {"params": params}, batch["image"], method=models.DualEncoder.embed_image
        )
        fns["embed_text"] = lambda params, batch: model.apply(
            {"params": params},
            batch["text_tokens"],
            batch["text_mask"],
            method=models.DualEncoder.embed_text,
        )
    if isinstance(model, vlm.VLM) and hasattr(model.bridge, "embed_text"):
        # A bridge with its own contrastive heads (BLIP-2's Q-Former ITC): retrieval.
        fns["embed_image"] = lambda params, batch: model.apply(
            {"params": params}, batch["image"], method=vlm.VLM.retrieval_image_embeddings
        )
        fns["embed_text"] = lambda params, batch: model.apply(
            {"params": params},
            batch["text_tokens"],
            batch["text_mask"],
            method=vlm.VLM.retrieval_text_embeddings,
        )
    if isinstance(model, vlm.VLM) and hasattr(model.bridge, "itm_logits"):
        # ... and an image-text matching head: re-ranking the ITC candidates.
        fns["image_features"] = lambda params, batch: model.apply(
            {"params": params}, batch["image"], method=vlm.VLM.retrieval_image_features
        )
        fns["match_score"] = lambda params, batch: model.apply(
            {"params": params},
            batch["image_features"],
            batch["text_tokens"],
            batch["text_mask"],
            method=vlm.VLM.retrieval_match_score,
        )
    jitted = {name: _jit(fn, mesh) for name, fn in fns.items()}
    if isinstance(model, (models.LanguageModel, models.Seq2SeqLanguageModel)) or (
        isinstance(model, vlm.VLM) and model.llm is not None
    ):
        jitted["generate"] = _generated_tokens(model, mesh)
    return jitted

"""A VLM whose LLM is an encoder-decoder (T5; BLIP-2 with FlanT5): the image tokens enter the
encoder, the decoder is trained by the prefix-LM objective and generates through the one decode
path, greedy ids equal to a step-by-step argmax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm import objectives, predict, sharding
from jaxvlm.bridges import build_bridge
from jaxvlm.encoders.vit import ViT
from jaxvlm.llms.t5 import T5
from jaxvlm.vlm import VLM

SIZE, PATCH, VISION_DIM, DIM, VOCAB = 16, 8, 16, 16, 32
N = (SIZE // PATCH) ** 2
IMAGE, PAD, EOS = VOCAB - 1, 0, 3
T, TD, B = 10, 6, 2


def _model() -> VLM:
    return VLM(
        encoder=ViT(
            image_size=SIZE, patch_size=PATCH, width=VISION_DIM, depth=1, num_heads=2, mlp_dim=32
        ),
        bridge=build_bridge({"name": "mlp_projector"}, vision_dim=VISION_DIM, llm_dim=DIM),
        llm=T5(
            vocab_size=VOCAB,
            dim=DIM,
            depth=1,
            decoder_depth=2,
            num_heads=2,
            head_dim=8,
            mlp_dim=32,
            gated_mlp=True,
            hidden_act="gelu_tanh",
            tie_embeddings=False,
            scale_decoder_outputs=False,
        ),
        image_token_id=IMAGE,
    )


def _batch():
    tokens = np.full((B, T), PAD, np.int32)
    mask = np.zeros((B, T), np.int32)
    for row, text in enumerate(([5, 6, 7], [8, 9])):  # bos-less: [image slots, text]
        ids = [IMAGE] * N + text
        tokens[row, : len(ids)], mask[row, : len(ids)] = ids, 1
    decoder_tokens = np.array([[PAD, 10, 11, EOS, PAD, PAD], [PAD, 12, EOS, PAD, PAD, PAD]])
    decoder_mask = (np.arange(TD) < np.array([[4], [3]])).astype(np.int32)
    loss_mask = decoder_mask.copy()
    loss_mask[:, 0] = 0
    images = jax.random.normal(jax.random.key(3), (B, 1, SIZE, SIZE, 3))
    return dict(
        tokens=jnp.asarray(tokens),
        mask=jnp.asarray(mask),
        images=images,
        image_mask=jnp.ones((B, 1), bool),
        decoder_tokens=jnp.asarray(decoder_tokens, jnp.int32),
        decoder_mask=jnp.asarray(decoder_mask),
        loss_mask=jnp.asarray(loss_mask),
    )


@functools.cache
def _params():
    batch = _batch()
    keys = ("mask", "decoder_tokens", "decoder_mask")
    init = lambda rng: _model().init(
        rng, batch["tokens"], batch["images"], batch["image_mask"], **{k: batch[k] for k in keys}
    )["params"]
    return jax.jit(init)(jax.random.key(1))


def _logits(params, batch):
    keys = ("mask", "decoder_tokens", "decoder_mask")
    return (
        _model()
        .apply(
            {"params": params},
            batch["tokens"],
            batch["images"],
            batch["image_mask"],
            **{k: batch[k] for k in keys},
        )
        .logits
    )


def test_the_image_tokens_enter_the_encoder():
    model, params, batch = _model(), _params(), _batch()
    bridge = model.apply(
        {"params": params}, batch["images"], batch["image_mask"], method=VLM.embed_images
    )[:, 0]
    text = model.apply({"params": params}, batch["tokens"], method=lambda m, t: m.llm.embed(t))
    expected_inputs = np.asarray(text).copy()
    expected_inputs[:, :N] = np.asarray(bridge)  # the placeholders lead each row
    t5 = model.llm
    encoded = t5.apply(
        {"params": params["llm"]},
        embeddings=jnp.asarray(expected_inputs),
        mask=batch["mask"],
        method=T5.encode,
    )
    expected = t5.apply(
        {"params": params["llm"]},
        batch["decoder_tokens"],
        encoded,
        batch["mask"],
        kv_mask=batch["decoder_mask"],
        method=T5.decode,
    ).logits
    np.testing.assert_allclose(_logits(params, batch), expected, rtol=1e-5, atol=1e-5)
    # Another image changes what the decoder predicts.
    other = dict(batch, images=batch["images"] + 1.0)
    assert not np.allclose(_logits(params, other), expected, atol=1e-4)


def test_prefix_lm_loss_is_the_decoder_cross_entropy_by_hand():
    params, batch = _params(), _batch()
    loss, metrics = objectives.prefix_lm_loss(
        _model(), params, {**batch, "unsplit": jnp.array([1, 0])}, None, mesh=None, config=None
    )
    log_probs = jax.nn.log_softmax(np.asarray(_logits(params, batch), np.float64), axis=-1)
    total, count = 0.0, 0
    for row in range(B):
        for t in range(TD - 1):
            if batch["loss_mask"][row, t + 1]:
                total -= log_probs[row, t, int(batch["decoder_tokens"][row, t + 1])]
                count += 1
    assert metrics["weight"] == count == 5
    np.testing.assert_allclose(loss, total / count, rtol=1e-5)
    assert metrics["unsplit_fraction"] == 0.5


def test_greedy_generation_equals_a_step_by_step_argmax():
    model, params, batch = _model(), _params(), _batch()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    prompt = {k: batch[k] for k in ("tokens", "mask", "images", "image_mask")}
    steps = 4
    out = predict.generate_fn(model, mesh)(
        params, prompt, max_new_tokens=steps, eos_id=None, pad_id=PAD
    )
    decoder = np.full((B, 1), PAD, np.int32)  # the decoder starts from the pad id (HF T5)
    for _ in range(steps):
        logits = _logits(
            params,
            dict(
                prompt,
                decoder_tokens=jnp.asarray(decoder),
                decoder_mask=jnp.ones_like(jnp.asarray(decoder)),
            ),
        )
        decoder = np.concatenate([decoder, np.argmax(logits[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(out.tokens, decoder[:, 1:])

"""VLM composition: placeholder scatter, masked image slots, placeholder check, frozen encoder."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.bridges import build_bridge
from jaxvlm.encoders.vit import ViT
from jaxvlm.llms.llama import Llama
from jaxvlm.vlm import VLM, check_placeholders

SIZE, PATCH, VISION_DIM, LLM_DIM, VOCAB = 16, 8, 16, 16, 32
N = (SIZE // PATCH) ** 2  # the projector drops the class token: one token per patch
IMAGE = VOCAB - 1  # the placeholder id in these tests
T = 12


def _model(freeze_encoder: bool = True) -> VLM:
    return VLM(
        encoder=ViT(
            image_size=SIZE, patch_size=PATCH, width=VISION_DIM, depth=1, num_heads=2, mlp_dim=32
        ),
        bridge=build_bridge({"name": "mlp_projector"}, vision_dim=VISION_DIM, llm_dim=LLM_DIM),
        llm=Llama(vocab_size=VOCAB, dim=LLM_DIM, depth=1, num_heads=2, mlp_dim=32),
        image_token_id=IMAGE,
        freeze_encoder=freeze_encoder,
    )


def _tokens(rows):
    """rows: lists of ints or "I" (a run of N placeholders), padded with 1 to T."""
    out = []
    for row in rows:
        ids = []
        for item in row:
            ids.extend([IMAGE] * N if item == "I" else [item])
        out.append(ids + [1] * (T - len(ids)))
    return jnp.asarray(out, jnp.int32)


def _images(batch, num_images, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, num_images, SIZE, SIZE, 3))


@functools.cache
def _params():
    images, mask = _images(1, 2), jnp.ones((1, 2), bool)
    init = jax.jit(lambda rng: _model().init(rng, _tokens([["I", "I"]]), images, mask)["params"])
    return init(jax.random.key(1))


def _embed(tokens, images, image_mask):
    model, variables = _model(), {"params": _params()}
    embedded = model.apply(variables, tokens, images, image_mask, method=VLM.embed_inputs)
    bridge = model.apply(variables, images, image_mask, method=VLM.embed_images)
    text = model.apply(variables, tokens, method=lambda m, t: m.llm.embed(t))
    return np.asarray(embedded), np.asarray(bridge), np.asarray(text)


@pytest.mark.parametrize(
    "rows, num_images",
    [
        ([["I", 3, 4, 5]], 1),  # prepended: placeholders at position 0
        ([[2, 3, "I", 4, 5]], 1),  # in the middle
        ([[2, "I", 3, "I", 4], ["I", 5, "I"]], 2),  # two images per row
    ],
)
def test_placeholders_take_the_bridge_tokens_in_order(rows, num_images):
    tokens = _tokens(rows)
    images, mask = _images(len(rows), num_images), jnp.ones((len(rows), num_images), bool)
    embedded, bridge, text = _embed(tokens, images, mask)
    assert embedded.shape == (len(rows), T, LLM_DIM)
    for b in range(len(rows)):
        where = np.flatnonzero(np.asarray(tokens[b]) == IMAGE)
        assert len(where) == num_images * N
        np.testing.assert_allclose(embedded[b, where], bridge[b].reshape(-1, LLM_DIM), rtol=1e-6)
        rest = np.setdiff1d(np.arange(T), where)
        np.testing.assert_allclose(embedded[b, rest], text[b, rest], rtol=1e-6)
    # The image tokens differ from one another, so "in order" is a real check.
    flat = bridge[0].reshape(-1, LLM_DIM)
    assert not np.allclose(flat[0], flat[-1])


def test_masked_slot_without_placeholders_leaves_text_untouched():
    tokens = _tokens([[2, "I", 3], [2, 3, 4, 5]])
    images, mask = _images(2, 1), jnp.array([[True], [False]])
    check_placeholders(tokens, mask, N, image_token_id=IMAGE)
    embedded, bridge, text = _embed(tokens, images, mask)
    np.testing.assert_allclose(embedded[1], text[1], rtol=1e-6)
    np.testing.assert_allclose(embedded[0, 1 : 1 + N], bridge[0, 0], rtol=1e-6)


def test_check_placeholders_names_the_row():
    tokens = _tokens([["I", 3], [2, 3]])
    mask = jnp.array([[True], [True]])
    with pytest.raises(ValueError, match=rf"row 1: 0 image placeholder.*= {N}"):
        check_placeholders(tokens, mask, N, image_token_id=IMAGE)


def _grads(freeze_encoder):
    model = _model(freeze_encoder)
    tokens, images, mask = _tokens([["I", 3, 4]]), _images(1, 1), jnp.ones((1, 1), bool)
    params = _params()
    loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, images, mask).logits ** 2)
    return jax.jit(jax.grad(loss))(params)


def _norm(tree):
    return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


def test_frozen_encoder_gets_no_gradient_and_bridge_does():
    grads = _grads(freeze_encoder=True)
    assert _norm(grads["encoder"]) == 0.0
    assert _norm(grads["bridge"]) > 0.0
    assert _norm(_grads(freeze_encoder=False)["encoder"]) > 0.0


@pytest.mark.parametrize(
    "trainable, frozen",
    [
        (("bridge/.*",), True),
        ((r"bridge/(?!(itm_head|temperature)).*",), True),
        (("bridge/.*", "encoder/.*"), False),  # BLIP-2's fine-tunes at size=paper
        ((".*",), False),
        (("bridge/.*", "encoder/layers_0/.*"), False),  # any one encoder parameter
    ],
)
def test_the_encoder_is_frozen_unless_config_trainable_names_it(tiny_config, trainable, frozen):
    from jaxvlm import vlm

    config = tiny_config("blip2", {"trainable": trainable}, stage=2)
    assert vlm.build_vlm(config).freeze_encoder is frozen


def test_call_gives_logits():
    tokens = _tokens([[2, "I", 3], ["I", 4, 5]])
    images, mask = _images(2, 1), jnp.ones((2, 1), bool)
    out = _model().apply({"params": _params()}, tokens, images, mask, mask=jnp.ones_like(tokens))
    assert out.logits.shape == (2, T, VOCAB)
    assert np.isfinite(np.asarray(out.logits)).all()


def test_llava_batches_put_the_image_tokens_on_their_placeholders(tiny_config, cache_dir):
    """A real "llava_captions" batch and the tiny LLaVA model agree on N and on the slots."""
    from jaxvlm import data
    from jaxvlm.vlm import build_vlm, conversation_format, tokens_per_image

    config = tiny_config("llava", stage=1)
    tokenizer = data.world_tokenizer()
    fmt = conversation_format(config, tokenizer)
    iterator = data.make_train_iterator(
        "llava_captions",
        data.open_world(config.data.world, cache_dir),
        tokenizer,
        data.ImagePreprocessing.from_config(config.preprocessing),
        split="train",
        global_batch_size=2,
        max_text_len=config.data.max_text_len,
        seed=0,
        conversation=fmt,
    )
    batch = next(iterator)
    iterator.close()
    tokens, images, image_mask = batch["tokens"], batch["images"], batch["image_mask"]
    model = build_vlm(config)

    @jax.jit
    def embed(tokens, images, image_mask):
        variables = model.init(
            jax.random.key(0), tokens, images, image_mask, method=VLM.embed_inputs
        )
        embedded = model.apply(variables, tokens, images, image_mask, method=VLM.embed_inputs)
        bridge = model.apply(variables, images, image_mask, method=VLM.embed_images)
        text = model.apply(variables, tokens, method=lambda m, t: m.llm.embed(t))
        return embedded, bridge, text

    embedded, bridge, text = embed(tokens, images, image_mask)
    assert bridge.shape[2] == fmt.tokens_per_image == tokens_per_image(config)
    for row in range(2):
        slots = np.flatnonzero(tokens[row] == config.data.image_token_id)
        np.testing.assert_allclose(embedded[row, slots], bridge[row, 0], rtol=1e-6)
        rest = np.setdiff1d(np.arange(tokens.shape[1]), slots)
        np.testing.assert_allclose(embedded[row, rest], text[row, rest], rtol=1e-6)

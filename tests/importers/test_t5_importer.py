"""T5 / FlanT5 import from a saved Hugging Face directory: parity with transformers'
`T5ForConditionalGeneration` (encoder states, teacher-forced logits, cached decoding, greedy
generation), strict keys, refused fields. The HF models are tiny random ones built and
`save_pretrained` here (no download)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from helpers import assert_logical_names, rewrite_safetensors

from jaxvlm import decoding, importers, llms
from jaxvlm.importers import CheckpointImportError
from jaxvlm.llms.t5 import T5, relative_position_bucket, t5_decoder
from jaxvlm.param_paths import flatten_params, unflatten_params

VOCAB, B, S, T = 96, 2, 9, 7
START, PAD, EOS = 0, 0, 1
# (a) original T5: relu, tied and scaled head, d_kv = d_model / heads; scanned layers.
# (b) FlanT5-like: gated-gelu, untied unscaled head, d_kv != d_model / heads, more decoder layers
#     than encoder layers; unscanned layers. Few buckets and a short max distance, so that the
#     logarithmic buckets are reached at these lengths.
CONFIGS = {
    "relu_tied": dict(
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        d_kv=8,
        num_decoder_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
    ),
    "gated_gelu_untied": dict(
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        d_kv=12,
        num_decoder_layers=3,
        relative_attention_num_buckets=10,
        relative_attention_max_distance=16,
    ),
}
SCAN_LAYERS = {"relu_tied": True, "gated_gelu_untied": False}


def _save_hf(name, directory):
    import transformers

    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        layer_norm_epsilon=1e-6,
        decoder_start_token_id=START,
        pad_token_id=PAD,
        eos_token_id=EOS,
        attn_implementation="eager",
        **CONFIGS[name],
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random norm scales: a missed or swapped one cannot pass by accident
        for key, p in model.named_parameters():
            if "layer_norm" in key:
                p.add_(0.2 * torch.randn_like(p))
        if not CONFIGS[name]["tie_word_embeddings"]:
            # transformers 5 always ties lm_head to shared; FlanT5 checkpoints carry their own.
            model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(VOCAB, 32))
    model.save_pretrained(directory)
    return model


def _import(directory, scan_layers=True, **fields):
    arch = importers.architecture("llm", directory)
    model = T5(**arch, scan_layers=scan_layers, **fields)
    ids = np.zeros((1, 4), np.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]
    expected = {f"llm/{k}": v for k, v in flatten_params(nn.unbox(boxed)).items()}
    component = {**arch, "scan_layers": scan_layers}
    loaded = importers.load_component("llm", directory, component, expected)
    return model, unflatten_params({k[len("llm/") :]: v for k, v in loaded.items()})


def _batch():
    """Encoder tokens with right padding in row 1; decoder inputs (start + shifted targets)
    with right padding in row 1."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(2, VOCAB, (B, S)).astype(np.int32)
    mask = np.ones((B, S), np.int32)
    tokens[1, -3:], mask[1, -3:] = PAD, 0
    targets = rng.integers(2, VOCAB, (B, T)).astype(np.int32)
    decoder_tokens = np.concatenate([np.full((B, 1), START, np.int32), targets[:, :-1]], axis=1)
    decoder_mask = np.ones((B, T), np.int32)
    decoder_tokens[1, -2:], decoder_mask[1, -2:] = PAD, 0
    return tokens, mask, decoder_tokens, decoder_mask


def _assert_close(ours, ref, real):
    ours, ref = np.asarray(ours)[real], np.asarray(ref)[real]
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.fixture(scope="module", params=list(CONFIGS))
def imported(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = _save_hf(request.param, directory)
    model, params = _import(directory, scan_layers=SCAN_LAYERS[request.param])
    return request.param, hf, model, params


def test_encoder_states_and_teacher_forced_logits_match_transformers(imported):
    _, hf, model, params = imported
    tokens, mask, decoder_tokens, decoder_mask = _batch()
    as_torch = lambda a: torch.tensor(a, dtype=torch.long)
    with torch.no_grad():
        ref_encoder = hf.encoder(input_ids=as_torch(tokens), attention_mask=as_torch(mask))
        ref = hf(
            input_ids=as_torch(tokens),
            attention_mask=as_torch(mask),
            decoder_input_ids=as_torch(decoder_tokens),
            decoder_attention_mask=as_torch(decoder_mask),
        ).logits.numpy()
    variables = {"params": params}
    with jax.default_matmul_precision("highest"):
        encoded = model.apply(variables, tokens, mask, method=T5.encode)
        ours = model.apply(variables, tokens, decoder_tokens, mask=mask, decoder_mask=decoder_mask)
        # The soft-prompt path (BLIP-2): embeddings in place of tokens give the same states.
        embedded = model.apply(variables, tokens, method=T5.embed)
        from_embeddings = model.apply(variables, None, mask, embeddings=embedded, method=T5.encode)
    _assert_close(encoded, ref_encoder.last_hidden_state.numpy(), mask.astype(bool))
    np.testing.assert_array_equal(np.asarray(from_embeddings), np.asarray(encoded))
    _assert_close(ours.logits, ref, decoder_mask.astype(bool))
    assert np.abs(ref).max() > 1.0  # not flat: the comparison decides something


def test_cached_decoding_equals_teacher_forcing(imported):
    """A 2-token prefill then one token per call through the cache (cross-attention keys and
    values filled by the first call, reused after) gives the teacher-forced logits."""
    _, _, model, params = imported
    tokens, mask, decoder_tokens, _ = _batch()
    variables = {"params": params}
    with jax.default_matmul_precision("highest"):
        full = model.apply(variables, tokens, decoder_tokens, mask=mask).logits
        encoded = model.apply(variables, tokens, mask, method=T5.encode)
        step = jax.jit(
            lambda ids, cache: model.apply(
                variables, ids, None, mask, cache=cache, method=T5.decode
            )
        )
        first = model.apply(
            variables,
            decoder_tokens[:, :2],
            encoded,
            mask,
            cache=model.init_cache(B, T),
            method=T5.decode,
        )
        logits, cache = [first.logits], first.cache
        assert cache.cross_k.shape[2] == S
        for t in range(2, T):
            output = step(decoder_tokens[:, t : t + 1], cache)
            logits.append(output.logits)
            cache = output.cache
    _assert_close(jnp.concatenate(logits, axis=1), full, np.ones((B, T), bool))
    assert int(cache.index) == T


def test_greedy_generation_equals_transformers_generate(imported):
    """Our decode loop (`t5_decoder`: encoder once, decoder with its cache) gives the ids of
    transformers' greedy `generate` on a padded batch, with an EOS that ends one row early."""
    _, hf, model, params = imported
    tokens, mask, _, _ = _batch()
    new = 8
    kwargs = dict(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask),
        do_sample=False,
        num_beams=1,
        max_new_tokens=new,
        pad_token_id=PAD,
        # transformers 5.23 sizes its generation cache by num_layers, so a decoder deeper than
        # the encoder fails there (IndexError); uncached generate is the same math.
        use_cache=hf.config.num_decoder_layers <= hf.config.num_layers,
    )
    with torch.no_grad():
        free = hf.generate(**kwargs, eos_token_id=None)[:, 1:].numpy()
        eos = int(free[0, 3])  # row 0 stops at its 4th token (or earlier)
        ref = hf.generate(**kwargs, eos_token_id=eos)[:, 1:].numpy()  # drop the start id
    with jax.default_matmul_precision("highest"):
        encoded = model.apply({"params": params}, tokens, mask, method=T5.encode)
        ours = decoding.generate(
            t5_decoder(model, scope=None),
            params,
            np.full((B, 1), START, np.int32),
            np.ones((B, 1), np.int32),
            max_new_tokens=new,
            eos_id=eos,
            pad_id=PAD,
            decoder_inputs=dict(encoder_output=encoded, encoder_mask=mask.astype(bool)),
        )
    np.testing.assert_array_equal(np.asarray(ours.tokens)[:, : ref.shape[1]], ref)
    assert ref.shape[1] < new or (ref[0] == PAD).any()  # the EOS path was taken


def test_relative_position_buckets_match_transformers():
    """Every distance up to past the maximum falls in HF's bucket, for T5's real settings
    (32 buckets, distance 128) and the tests' ones, both directions."""
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-300, 301)
    settings = [(32, 128)] + [
        (c["relative_attention_num_buckets"], c["relative_attention_max_distance"])
        for c in CONFIGS.values()
    ]
    for num_buckets, max_distance in settings:
        for bidirectional in (True, False):
            ref = T5Attention._relative_position_bucket(
                torch.tensor(relative), bidirectional, num_buckets, max_distance
            ).numpy()
            ours = relative_position_bucket(
                jnp.asarray(relative),
                bidirectional=bidirectional,
                num_buckets=num_buckets,
                max_distance=max_distance,
            )
            np.testing.assert_array_equal(np.asarray(ours), ref)


def test_architecture_reads_each_head_convention():
    """Old config.json (FlanT5: tie_word_embeddings=false) and transformers 5's (always tied,
    scale_decoder_outputs says which) give the same head; num_decoder_layers defaults."""
    base = dict(model_type="t5", vocab_size=VOCAB, d_model=32, d_kv=12, d_ff=48, num_heads=4)
    flan_old = importers.t5.architecture({**base, "tie_word_embeddings": False})
    flan_new = importers.t5.architecture(
        {**base, "tie_word_embeddings": True, "scale_decoder_outputs": False}
    )
    original = importers.t5.architecture({**base, "num_layers": 3})
    for arch in (flan_old, flan_new):
        assert not arch["tie_embeddings"] and not arch["scale_decoder_outputs"]
    assert original["tie_embeddings"] and original["scale_decoder_outputs"]
    assert original["depth"] == original["decoder_depth"] == 3
    assert flan_old["head_dim"] == 12 and flan_old["hidden_act"] == "relu"


def test_strict_key_accounting(tmp_path):
    """Stored copies of tied tables load when equal and are refused when not; the unused
    decoder cross-attention bias of old checkpoints is ignored as HF does; a stray tensor is
    listed and a missing one named."""
    _save_hf("relu_tied", tmp_path)
    _, expected = _import(tmp_path)
    bias_key = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"

    def add_copies(tensors):
        for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            tensors[key] = tensors["shared.weight"].copy()
        tensors[bias_key] = np.ones((8, 4), np.float32)

    rewrite_safetensors(tmp_path, add_copies)
    _, params = _import(tmp_path)
    for key, value in flatten_params(expected).items():
        np.testing.assert_array_equal(flatten_params(params)[key], value, err_msg=key)

    def perturb(tensors):
        tensors["decoder.embed_tokens.weight"] = tensors["decoder.embed_tokens.weight"] + 1

    rewrite_safetensors(tmp_path, perturb)
    with pytest.raises(CheckpointImportError, match=r"decoder.embed_tokens.weight differs"):
        _import(tmp_path)
    rewrite_safetensors(
        tmp_path,
        lambda t: t.update(
            {"decoder.embed_tokens.weight": t["shared.weight"], "encoder.extra": np.ones(2)}
        ),
    )
    with pytest.raises(CheckpointImportError, match=r"1 checkpoint tensors were not used.*extra"):
        _import(tmp_path)
    missing = "decoder.block.1.layer.1.EncDecAttention.k.weight"

    def remove(tensors):
        del tensors["encoder.extra"], tensors[missing]

    rewrite_safetensors(tmp_path, remove)
    with pytest.raises(CheckpointImportError, match=rf"'{missing}' is missing"):
        _import(tmp_path)


def test_unsupported_fields_are_named(tmp_path):
    _save_hf("relu_tied", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for field, value, pattern in (
        ("feed_forward_proj", "gated-silu", r"feed_forward_proj='gated-silu'.*relu, gated-gelu"),
        ("is_encoder_decoder", False, r"is_encoder_decoder=False"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(CheckpointImportError, match=pattern):
            importers.architecture("llm", tmp_path)


def test_config_llm_name_t5_builds_and_loads(tmp_path):
    """`config.llm = dict(name="t5", checkpoint=DIR, ...)`: the architecture comes from
    config.json, `build_llm` makes the T5, the weights fill it, and every parameter (added
    embeddings and bf16 storage included) carries logical names."""
    _save_hf("gated_gelu_untied", tmp_path)
    llm = dict(
        name="t5",
        checkpoint=str(tmp_path),
        num_added_embeddings=2,
        scan_layers=True,
        remat="none",
        implementation=None,
        dtype="float32",
        param_dtype="bfloat16",
    )
    config = ml_collections.ConfigDict(dict(llm=llm))
    importers.resolve_architectures(config)
    model = llms.build_llm(config.llm)
    assert isinstance(model, T5) and model.decoder_depth == 3 and not model.tie_embeddings
    ids = jnp.zeros((1, 4), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]
    assert assert_logical_names(boxed) > 10
    expected = {f"llm/{k}": v for k, v in flatten_params(nn.unbox(boxed)).items()}
    loaded = importers.load_component("llm", tmp_path, config.llm, expected)
    assert "llm/shared/added_embedding" not in loaded  # fresh, never imported
    assert loaded["llm/decoder/layers/cross_attn/q_proj/kernel"].shape == (3, 32, 4, 12)

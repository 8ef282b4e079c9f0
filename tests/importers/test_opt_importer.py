"""OPT import from a saved Hugging Face directory: parity with transformers' `OPTForCausalLM`
(hidden states, logits, greedy generation), strict keys, bad input, config presets. The HF models
are tiny random ones built and `save_pretrained` here (no download)."""

import functools
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from helpers import CONFIGS as CONFIGS_DIR
from helpers import assert_logical_names, rewrite_safetensors

from jaxvlm import config_utils, importers
from jaxvlm.importers import CheckpointImportError
from jaxvlm.llms import build_llm
from jaxvlm.llms.opt import Opt
from jaxvlm.param_paths import flatten_params, unflatten_params

VOCAB, B, T = 96, 2, 12
CONFIGS = {
    # OPT-125m/2.7b-like: pre-LN, biases, tied head; plus OPT-350m's project_in/out.
    "pre_ln_bias_tied_projected": dict(
        hidden_size=32,
        word_embed_proj_dim=16,
        ffn_dim=48,
        num_attention_heads=4,
        do_layer_norm_before=True,
        enable_bias=True,
        tie_word_embeddings=True,
    ),
    # OPT-350m-like post-LN (no final layer norm), no biases, untied head, another activation.
    "post_ln_no_bias_untied": dict(
        hidden_size=32,
        ffn_dim=48,
        num_attention_heads=2,
        do_layer_norm_before=False,
        enable_bias=False,
        tie_word_embeddings=False,
        activation_function="gelu",
    ),
    # Norms without parameters, and an old checkpoint's `_remove_final_layer_norm`.
    "pre_ln_plain_norms_no_final": dict(
        hidden_size=32,
        ffn_dim=48,
        num_attention_heads=4,
        layer_norm_elementwise_affine=False,
        _remove_final_layer_norm=True,
        activation_function="gelu_new",
    ),
}


def _save_hf(kwargs, directory):
    import transformers

    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        num_hidden_layers=2,
        max_position_embeddings=32,
        init_std=0.3,  # logits far from flat
        attn_implementation="eager",
        **kwargs,
    )
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():  # random biases and norm parameters: a missed one cannot pass by accident
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


@functools.cache
def _expected_shapes(model: Opt) -> dict:
    tokens = np.zeros((1, 4), np.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    return {f"llm/{k}": v for k, v in flatten_params(nn.unbox(boxed)).items()}


def _import(directory, scan_layers=True):
    arch = importers.architecture("llm", directory)
    model = Opt(**arch, scan_layers=scan_layers)
    component = {**arch, "scan_layers": scan_layers}
    loaded = importers.load_component("llm", directory, component, _expected_shapes(model))
    return model, unflatten_params({k[len("llm/") :]: v for k, v in loaded.items()})


def _left_padded_batch(seed, length, pad):
    tokens = np.array(jax.random.randint(jax.random.key(seed), (B, length), 6, VOCAB), np.int32)
    mask = np.ones_like(tokens)
    tokens[1, :4], mask[1, :4] = pad, 0  # left padding in the second row
    return tokens, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hidden_and_logits_match_transformers_with_left_padding(name, tmp_path):
    """Scanned and unscanned imports both match HF (hidden after the final norm and project_out,
    and logits) on the real tokens; HF derives the positions from the attention mask itself."""
    hf = _save_hf(CONFIGS[name], tmp_path)
    tokens, mask = _left_padded_batch(1, T, pad=1)
    with torch.no_grad():
        inputs = dict(
            input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)
        )
        ref_hidden = hf.model.decoder(**inputs).last_hidden_state.numpy()
        ref_logits = hf(**inputs).logits.numpy()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    real = mask.astype(bool)
    outputs = {}
    for scan_layers in (True, False):
        model, params = _import(tmp_path, scan_layers=scan_layers)
        with jax.default_matmul_precision("highest"):
            outputs[scan_layers] = model.apply(
                {"params": params}, tokens, kv_mask=real, positions=positions
            )
        for ours, ref in (
            (outputs[scan_layers].hidden, ref_hidden),
            (outputs[scan_layers].logits, ref_logits),
        ):
            error = np.abs(np.asarray(ours)[real] - ref[real]).max()
            assert error <= 1e-4 * max(1.0, np.abs(ref[real]).max()), (scan_layers, error)
    assert np.abs(ref_logits).max() > 1.0  # not flat: the comparison decides something
    # Scanned and unrolled stacks fuse differently: equal up to float32 reordering.
    np.testing.assert_allclose(outputs[True].logits, outputs[False].logits, rtol=1e-5, atol=1e-5)


def test_embeddings_input_matches_hf_inputs_embeds(tmp_path):
    """`embeddings=` (the VLM's path: width `dim`, before project_in) matches HF `inputs_embeds`
    on arbitrary vectors (as a bridge's image tokens are), and `embed` then `embeddings=` is
    exactly the token path."""
    hf = _save_hf(CONFIGS["pre_ln_bias_tied_projected"], tmp_path)
    model, params = _import(tmp_path, scan_layers=False)
    assert (model.dim, model.layer_dim) == (16, 32)
    tokens, mask = _left_padded_batch(2, 8, pad=1)
    real = mask.astype(bool)
    kwargs = dict(kv_mask=real, positions=np.maximum(np.cumsum(mask, 1) - 1, 0))
    vectors = np.random.default_rng(0).standard_normal((B, 8, model.dim)).astype(np.float32)
    with torch.no_grad():
        ref = hf(inputs_embeds=torch.tensor(vectors), attention_mask=torch.tensor(mask)).logits
    with jax.default_matmul_precision("highest"):
        ours = model.apply({"params": params}, embeddings=vectors, **kwargs).logits
    ref = ref.numpy()
    assert np.abs(np.asarray(ours)[real] - ref[real]).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    embeddings = model.apply({"params": params}, tokens, method=Opt.embed)
    by_tokens = model.apply({"params": params}, tokens, **kwargs).logits
    by_embeddings = model.apply({"params": params}, embeddings=embeddings, **kwargs).logits
    np.testing.assert_array_equal(by_embeddings, by_tokens)


@pytest.mark.parametrize("name", ["pre_ln_bias_tied_projected", "post_ln_no_bias_untied"])
def test_greedy_generation_equals_transformers_generate(name, tmp_path):
    """The imported model through our decode loop (KV cache, left padding, positions from the mask
    cumsum) produces the token ids of transformers' greedy `generate` on the same weights."""
    from jaxvlm import decoding

    hf = _save_hf(CONFIGS[name], tmp_path)
    model, params = _import(tmp_path)
    new, eos, pad = 8, 5, 1
    tokens, mask = _left_padded_batch(3, 7, pad=pad)
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            num_beams=1,
            max_new_tokens=new,
            eos_token_id=eos,
            pad_token_id=pad,
        )[:, tokens.shape[1] :].numpy()
    with jax.default_matmul_precision("highest"):
        ours = decoding.generate(
            decoding.llm_decoder(model, scope=None),
            params,
            tokens,
            mask,
            max_new_tokens=new,
            eos_id=eos,
            pad_id=pad,
        )
    ours = np.asarray(ours.tokens)[:, : ref.shape[1]]
    np.testing.assert_array_equal(ours, ref)


def test_architecture_reads_every_math_field(tmp_path):
    _save_hf(CONFIGS["post_ln_no_bias_untied"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    post_ln = importers.opt.architecture(config)
    assert post_ln == dict(
        vocab_size=VOCAB,
        dim=32,
        layer_dim=32,
        depth=2,
        num_heads=2,
        mlp_dim=48,
        max_positions=32,
        hidden_act="gelu",
        pre_layer_norm=False,
        final_norm=False,  # HF builds no decoder final_layer_norm for a post-LN OPT
        use_bias=False,
        norm_affine=True,
        tie_embeddings=False,
    )
    assert set(post_ln) == set(importers.opt.ARCHITECTURE_FIELDS)
    old = importers.opt.architecture({**config, "do_layer_norm_before": True})
    assert old["final_norm"] and old["pre_layer_norm"]
    removed = {**config, "do_layer_norm_before": True, "_remove_final_layer_norm": True}
    assert not importers.opt.architecture(removed)["final_norm"]
    projected = importers.opt.architecture({**config, "word_embed_proj_dim": 16})
    assert (projected["dim"], projected["layer_dim"]) == (16, 32)


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "hf"
    _save_hf(CONFIGS["pre_ln_bias_tied_projected"], directory)
    return directory


def test_a_missing_tensor_is_named(saved):
    rewrite_safetensors(saved, lambda t: t.pop("model.decoder.project_out.weight"))
    with pytest.raises(
        CheckpointImportError, match=r"'model.decoder.project_out.weight' is missing"
    ):
        _import(saved)


def test_an_extra_tensor_is_named(saved):
    extra = "model.decoder.layers.0.self_attn.rotary.weight"
    rewrite_safetensors(saved, lambda t: t.update({extra: np.ones(3, np.float32)}))
    with pytest.raises(CheckpointImportError, match=r"1 checkpoint tensors were not used.*rotary"):
        _import(saved)


def test_a_tied_head_must_equal_the_embedding(saved):
    def add_head(tensors):
        tensors["lm_head.weight"] = tensors["model.decoder.embed_tokens.weight"] + 1.0

    rewrite_safetensors(saved, add_head)
    with pytest.raises(CheckpointImportError, match=r"lm_head.weight differs"):
        _import(saved)


def test_unsupported_values_name_the_field(saved):
    config = json.loads((saved / "config.json").read_text())
    for field, value, pattern in (
        ("activation_function", "mish", r"activation_function='mish'.*supported: silu"),
        ("num_attention_heads", 5, r"num_attention_heads=5.*hidden_size=32"),
        ("model_type", "gpt2", r"model_type 'gpt2' cannot be imported as config.llm.*opt"),
    ):
        (saved / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(CheckpointImportError, match=pattern):
            importers.architecture("llm", saved)


def test_a_config_block_named_opt_takes_its_architecture_from_the_checkpoint(saved):
    """`config.llm = dict(name="opt", checkpoint=DIR)` as a run writes it: `resolve_architectures`
    fills the fields from config.json, `build_llm` builds it and `load_component` accepts it."""
    import ml_collections

    config = ml_collections.ConfigDict(
        dict(llm=dict(name="opt", checkpoint=str(saved), scan_layers=False, dtype="float32"))
    )
    importers.resolve_architectures(config)
    assert config.llm.dim == 16 and config.llm.layer_dim == 32 and config.llm.tie_embeddings
    model = build_llm(config.llm)
    loaded = importers.load_component("llm", saved, config.llm, _expected_shapes(model))
    assert "llm/layers_1/mlp/fc2/bias" in loaded and "llm/project_in/kernel" in loaded


def test_presets_have_the_parameter_counts_of_transformers():
    """configs/backbones.py `opt(...)` presets build (abstractly) with exactly as many parameters
    as transformers' OPTForCausalLM of the same shape (built on the meta device: no memory)."""
    import transformers

    backbones = config_utils.load_sibling(str(CONFIGS_DIR / "llava.py"), "backbones")
    hf_fields = {
        "opt_125m": dict(
            hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12
        ),
        "opt_350m": dict(
            hidden_size=1024,
            word_embed_proj_dim=512,
            num_hidden_layers=24,
            ffn_dim=4096,
            num_attention_heads=16,
            do_layer_norm_before=False,
        ),
        "opt_2.7b": dict(
            hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32
        ),
        "opt_6.7b": dict(
            hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32
        ),
    }
    assert set(hf_fields) == set(backbones.OPT_PRESETS)
    for preset, fields in hf_fields.items():
        model = build_llm({"name": "opt", **backbones.opt(preset)})
        ours = sum(int(np.prod(s.shape)) for s in _expected_shapes(model).values())
        with torch.device("meta"):
            hf = transformers.OPTForCausalLM(transformers.OPTConfig(**fields))
        assert ours == sum(p.numel() for p in hf.parameters()), preset


def test_logical_names_and_refusals():
    """Every parameter carries logical names (scanned and not, added rows, untied head); a
    cross-attention hook and a sequence longer than the position table are refused."""
    tiny = dict(vocab_size=VOCAB, dim=16, layer_dim=32, depth=2, num_heads=4, mlp_dim=48)
    tokens = np.zeros((1, 4), np.int32)
    for model in (
        Opt(**tiny, num_added_embeddings=2, tie_embeddings=False),
        Opt(**tiny, scan_layers=False),
    ):
        boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
        assert assert_logical_names(boxed) > 10
    with pytest.raises(ValueError, match=r"cross_attention hooks .* not supported"):
        Opt(**tiny, cross_attention=object())
    short = Opt(**tiny, max_positions=3)
    with pytest.raises(ValueError, match=r"4 tokens .* exceed max_positions=3"):
        jax.eval_shape(short.init, jax.random.key(0), tokens)

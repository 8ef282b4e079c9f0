"""BERT import from a saved Hugging Face directory: parity with transformers' `BertModel` (every
layer's hidden state and the pooler, with padding and token types), layer-by-layer application,
strict keys and refused config fields. The HF models are tiny random ones built and
`save_pretrained` here (no download)."""

import json

import jax
import numpy as np
import pytest
import torch
from helpers import assert_logical_names, rewrite_safetensors

from jaxvlm.importers import CheckpointImportError, HFCheckpoint, bert
from jaxvlm.layers.bert import BertModel

VOCAB, B, T = 64, 2, 10
CONFIGS = {
    # bert-base-like: exact gelu, eps 1e-12, a `BertModel` with its pooler (keys without prefix).
    "gelu_pooler": dict(hidden_act="gelu", layer_norm_eps=1e-12, type_vocab_size=2),
    # A task model's checkpoint (`bert.` prefix, MLM head `cls.*`, no pooler), tanh gelu, eps 1e-5.
    "gelu_new_masked_lm": dict(hidden_act="gelu_new", layer_norm_eps=1e-5, type_vocab_size=3),
}


def _save_hf(name, directory):
    """Saves a tiny random BERT; returns the `BertModel` (a task model's `.bert`) to compare to."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
        initializer_range=0.2,
        attn_implementation="eager",
        **CONFIGS[name],
    )
    torch.manual_seed(0)
    if name == "gelu_pooler":
        model = transformers.BertModel(config).eval()
    else:
        model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():  # random biases and norm parameters: a missed one cannot pass by accident
        for key, p in model.named_parameters():
            if key.endswith("bias") or "LayerNorm" in key:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model if name == "gelu_pooler" else model.bert


def _inputs(type_vocab_size):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, (B, T)).astype(np.int32)
    token_types = rng.integers(0, type_vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    tokens[1, 6:], mask[1, 6:] = 0, 0  # right padding in the second row
    return tokens, token_types, mask


def _close(ours, ref, real):
    ours, ref = np.asarray(ours)[real], np.asarray(ref)[real]
    return np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def _apply(model, params, *args, **kwargs):
    with jax.default_matmul_precision("highest"):
        return model.apply({"params": params}, *args, **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_hidden_state_and_the_pooler_match_transformers(name, tmp_path):
    hf = _save_hf(name, tmp_path)
    tokens, token_types, mask = _inputs(CONFIGS[name]["type_vocab_size"])
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(token_types, dtype=torch.long),
            output_hidden_states=True,
        )
    fields, params = bert.load(tmp_path, scan_layers=False)
    assert fields["pooler"] == (name == "gelu_pooler")
    model = BertModel(**fields)
    out = _apply(model, params, tokens, mask, token_types, return_hidden_states=True)
    real = mask.astype(bool)
    assert out.hidden_states.shape == (3, B, T, 32)
    for i, ref_hidden in enumerate(ref.hidden_states):
        assert _close(out.hidden_states[i], ref_hidden.numpy(), real), i
    assert _close(out.hidden, ref.last_hidden_state.numpy(), real)
    if fields["pooler"]:
        assert _close(out.pooled, ref.pooler_output.numpy(), np.ones(B, bool))
        assert np.abs(ref.pooler_output.numpy()).max() > 0.1  # not saturated or zero
    else:
        assert out.pooled is None and ref.pooler_output is None
    # Real tokens do not see the padding: other ids and types there change none of their states.
    tokens[1, 6:], token_types[1, 6:] = 7, 1
    other = _apply(model, params, tokens, mask, token_types)
    np.testing.assert_allclose(other.hidden[real], out.hidden[real], rtol=1e-6, atol=1e-6)


def test_scanned_stack_and_its_layers_one_by_one_equal_the_unrolled_stack(tmp_path):
    """The scanned import gives the unrolled one's states, and `embed` then `apply_layer` per
    layer (a Q-Former's loop, here on the stacked params) gives the stack's."""
    _save_hf("gelu_pooler", tmp_path)
    tokens, token_types, mask = _inputs(2)
    fields, unrolled_params = bert.load(tmp_path, scan_layers=False)
    unrolled = _apply(BertModel(**fields), unrolled_params, tokens, mask, token_types)
    fields, params = bert.load(tmp_path, scan_layers=True)
    model = BertModel(**fields)
    full = _apply(model, params, tokens, mask, token_types, return_hidden_states=True)
    np.testing.assert_allclose(full.hidden, unrolled.hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full.pooled, unrolled.pooled, rtol=1e-5, atol=1e-5)
    attention = mask.astype(bool)[:, None, None, :]
    x = _apply(model, params, tokens, token_types, method=BertModel.embed)
    for i in range(fields["depth"]):
        x = _apply(model, params, i, x, attention, method=BertModel.apply_layer)
        np.testing.assert_allclose(x, full.hidden_states[i + 1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"index 2 is outside \[0, 2\)"):
        _apply(model, params, 2, x, attention, method=BertModel.apply_layer)


def test_architecture_reads_every_math_field(tmp_path):
    _save_hf("gelu_new_masked_lm", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    arch = bert.architecture(config)
    assert arch == dict(
        vocab_size=VOCAB,
        dim=32,
        depth=2,
        num_heads=4,
        mlp_dim=48,
        max_positions=16,
        type_vocab_size=3,
        hidden_act="gelu_tanh",
        layer_norm_eps=1e-5,
    )
    assert set(arch) == set(bert.ARCHITECTURE_FIELDS)
    assert bert.architecture({**config, "hidden_act": "relu"})["hidden_act"] == "relu"
    legacy = {**config, "hidden_act": "gelu_pytorch_tanh", "position_embedding_type": "absolute"}
    assert bert.architecture(legacy)["hidden_act"] == "gelu_tanh"


def test_logical_names_scanned_and_unrolled():
    tiny = dict(vocab_size=VOCAB, dim=32, depth=2, num_heads=4, mlp_dim=48, max_positions=16)
    tokens = np.zeros((1, 4), np.int32)
    for model in (BertModel(**tiny), BertModel(**tiny, scan_layers=False, pooler=False)):
        boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
        assert assert_logical_names(boxed) > 10


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "hf"
    _save_hf("gelu_new_masked_lm", directory)
    return directory


def test_heads_and_buffers_are_ignored_but_other_extra_tensors_are_named(saved):
    keys = HFCheckpoint(saved).keys()
    assert any(k.startswith("cls.predictions.") for k in keys)  # the MLM head is present
    buffer = "bert.embeddings.position_ids"  # as older checkpoints store it
    rewrite_safetensors(saved, lambda t: t.update({buffer: np.arange(16)[None]}))
    bert.load(saved)
    extra = "bert.encoder.layer.0.attention.self.rotary.weight"
    rewrite_safetensors(saved, lambda t: t.update({extra: np.ones(3, np.float32)}))
    with pytest.raises(
        CheckpointImportError, match=r"^\S+: 1 checkpoint tensors were not used.*rotary"
    ):
        bert.load(saved)


def test_missing_tensors_are_named(saved):
    key = "bert.encoder.layer.1.output.dense.bias"
    rewrite_safetensors(saved, lambda t: t.pop(key))
    with pytest.raises(CheckpointImportError, match=rf"tensor '{key}' is missing"):
        bert.load(saved)
    # A pooler the checkpoint does not hold (a task model's) is missing too.
    _save_hf("gelu_new_masked_lm", saved)
    with pytest.raises(CheckpointImportError, match=r"'bert.pooler.dense.weight' is missing"):
        bert.load(saved, pooler=True)


def test_a_wrong_shape_is_named(saved):
    key = "bert.embeddings.token_type_embeddings.weight"
    rewrite_safetensors(saved, lambda t: t.update({key: t[key][:2]}))
    with pytest.raises(
        CheckpointImportError, match=r"token_type_embeddings \(2, 32\) vs \(3, 32\)"
    ):
        bert.load(saved)


def test_gamma_beta_layer_norms_of_old_checkpoints_are_read(saved):
    fields, params = bert.load(saved, scan_layers=False)

    def rename(tensors):
        for key in [k for k in tensors if k.endswith("LayerNorm.weight")]:
            tensors[key.replace(".weight", ".gamma")] = tensors.pop(key)
        for key in [k for k in tensors if k.endswith("LayerNorm.bias")]:
            tensors[key.replace(".bias", ".beta")] = tensors.pop(key)

    rewrite_safetensors(saved, rename)
    _, renamed = bert.load(saved, scan_layers=False)
    jax.tree.map(np.testing.assert_array_equal, renamed, params)


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("hidden_act", "silu", r"hidden_act='silu' is not supported.*gelu_new"),
        ("position_embedding_type", "relative_key", r"position_embedding_type='relative_key'"),
        ("is_decoder", True, r"is_decoder=True is not supported"),
        ("add_cross_attention", True, r"add_cross_attention=True is not supported"),
        ("num_attention_heads", 5, r"num_attention_heads=5 .*hidden_size=32"),
        ("model_type", "roberta", r"model_type='roberta' is not supported"),
    ],
)
def test_unsupported_values_are_one_line_errors_naming_the_field(saved, field, value, pattern):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(CheckpointImportError, match=pattern) as error:
        bert.load(saved)
    assert "\n" not in str(error.value)

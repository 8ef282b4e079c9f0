"""Llama / Qwen2 import from a saved Hugging Face directory: parity with transformers, strict keys,
bad input. The HF models are tiny random ones built and `save_pretrained` here (no download)."""

import json
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from helpers import rewrite_safetensors

from jaxvlm import importers
from jaxvlm.importers import CheckpointImportError, HFCheckpoint
from jaxvlm.llms.llama import Llama
from jaxvlm.param_paths import flatten_params, unflatten_params

VOCAB, B, T = 96, 2, 12
# Two configurations per family: bias on/off, GQA and MHA, tied and untied, rope scaling.
CONFIGS = {
    "llama_bias_gqa_linear": (
        "llama",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
        ),
    ),
    "llama_tied_head_dim_llama3": (
        "llama",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            tie_word_embeddings=True,
            hidden_act="gelu_pytorch_tanh",
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
    ),
    "qwen2_tied_gqa": (
        "qwen2",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        ),
    ),
    "qwen2_untied_dynamic": (
        "qwen2",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            max_position_embeddings=8,  # T = 12 > 8: the dynamic NTK scaling is active
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
}


def _save_hf(family, kwargs, directory):
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    config = config_class(
        vocab_size=VOCAB,
        num_hidden_layers=2,
        rms_norm_eps=1e-6,
        initializer_range=0.3,  # logits far from flat
        attn_implementation="eager",
        **kwargs,
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # random biases and norm scales: a missed one cannot pass by accident
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def _import(directory, scan_layers=True):
    arch = importers.architecture("llm", directory)
    model = Llama(**arch, scan_layers=scan_layers)
    tokens = np.zeros((1, 4), np.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    shapes = flatten_params(nn.unbox(boxed))
    expected = {f"llm/{k}": v for k, v in shapes.items()}
    component = {**arch, "scan_layers": scan_layers}
    loaded = importers.load_component("llm", directory, component, expected)
    params = unflatten_params({k[len("llm/") :]: v for k, v in loaded.items()})
    return model, params


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_with_padding(name, tmp_path):
    family, kwargs = CONFIGS[name]
    hf = _save_hf(family, kwargs, tmp_path)
    model, params = _import(tmp_path, scan_layers=name.endswith("linear"))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB), np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, :4] = 0  # left padding in the second row
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        ).logits.numpy()
    with jax.default_matmul_precision("highest"):
        ours = model.apply(
            {"params": params}, tokens, kv_mask=mask.astype(bool), positions=positions
        ).logits
    real = mask.astype(bool)
    error = np.abs(np.asarray(ours)[real] - ref[real]).max()
    assert error <= 1e-4 * max(1.0, np.abs(ref[real]).max())
    assert np.abs(ref).max() > 1.0  # not flat: the comparison decides something


def test_architecture_reads_both_rope_layouts(tmp_path):
    _save_hf(*CONFIGS["qwen2_tied_gqa"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    new = importers.llama.architecture(config)
    old = dict(config)
    parameters = old.pop("rope_parameters")
    old["rope_theta"] = parameters["rope_theta"]  # transformers 4's top-level fields
    old["rope_scaling"] = {"type": "linear", "factor": 3.0}
    legacy = importers.llama.architecture(old)
    assert new["rope_theta"] == legacy["rope_theta"] == 1000.0
    assert new["rope_scaling"] is None
    assert legacy["rope_scaling"] == {"rope_type": "linear", "factor": 3.0}
    assert new["qkv_bias"] and not new["attention_bias"] and new["num_kv_heads"] == 1


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "hf"
    _save_hf(*CONFIGS["llama_bias_gqa_linear"], directory)
    return directory


def test_a_missing_tensor_is_named(saved):
    rewrite_safetensors(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.bias"))
    with pytest.raises(
        CheckpointImportError, match=r"'model.layers.1.mlp.up_proj.bias' is missing"
    ):
        _import(saved)


def test_unused_tensors_are_listed(saved):
    rewrite_safetensors(saved, lambda t: t.update({"model.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(
        CheckpointImportError, match=r"1 checkpoint tensors were not used.*model.extra"
    ):
        _import(saved)


def test_a_wrong_shape_is_named(saved):
    def shrink(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1]

    rewrite_safetensors(saved, shrink)
    with pytest.raises(CheckpointImportError, match=r"llm/norm/scale \(31,\) vs \(32,\)"):
        _import(saved)


def test_unsupported_values_name_the_field(saved):
    config = json.loads((saved / "config.json").read_text())
    for field, value, pattern in (
        ("hidden_act", "mish", r"hidden_act='mish'.*supported: silu"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1.0}, r"rope_type='yarn'"),
        ("model_type", "gpt2", r"model_type 'gpt2' cannot be imported as config.llm.*llama.*qwen2"),
    ):
        (saved / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(CheckpointImportError, match=pattern):
            importers.architecture("llm", saved)


def test_directories_without_usable_weights_are_refused(saved, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointImportError, match=r"no config.json"):
        HFCheckpoint(empty)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(saved / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointImportError, match=r"pytorch_model.bin.*safetensors only"):
        HFCheckpoint(pickled)
    sharded = tmp_path / "sharded"
    shutil.copytree(saved, sharded)
    names = HFCheckpoint(saved).keys()
    index = {"weight_map": {name: "model-00001-of-00002.safetensors" for name in names}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointImportError, match=r"missing: .*model-00001-of-00002"):
        HFCheckpoint(sharded)


def test_bf16_tensors_are_read_without_torch(saved):
    import ml_dtypes

    rewrite_safetensors(
        saved, lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    )
    checkpoint = HFCheckpoint(saved)
    value = checkpoint.take("model.norm.weight")
    assert value.dtype == ml_dtypes.bfloat16 and value.shape == (32,)


def test_a_vlm_trains_on_an_imported_llm(tmp_path, tiny_config, cache_dir):
    """`config.llm.checkpoint` = an HF directory: the architecture comes from its config.json, the
    weights load exactly, and LLaVA stage 1 leaves them bit-identical; a resumed run re-imports."""
    from jaxvlm import checkpoint, evaluate, train

    hf_dir = tmp_path / "hf_llama"
    kwargs = dict(CONFIGS["qwen2_tied_gqa"][1], hidden_size=48)
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=1024, num_hidden_layers=2, attn_implementation="eager", **kwargs
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(hf_dir)
    overrides = {
        "llm.checkpoint": str(hf_dir),
        "evals.vqa.every_steps": 0,
        "evals.caption.every_steps": 0,
    }
    run_config = tiny_config("llava", overrides, stage=1)
    summary = train.train(run_config, tmp_path / "run", cache_dir=cache_dir)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["llm"]["dim"] == 48 and saved["llm"]["num_kv_heads"] == 1
    assert saved["llm"]["qkv_bias"] and saved["llm"]["tie_embeddings"]
    reference = HFCheckpoint(hf_dir)
    params = checkpoint.flatten_params(summary["state"].params)
    np.testing.assert_array_equal(
        np.asarray(params["llm/embed_tokens/embedding"]),
        reference.take("model.embed_tokens.weight"),
    )
    if saved["llm"]["scan_layers"]:
        k_bias = np.asarray(params["llm/layers/self_attn/k_proj/bias"])[1]
    else:
        k_bias = np.asarray(params["llm/layers_1/self_attn/k_proj/bias"])
    np.testing.assert_array_equal(
        k_bias, reference.take("model.layers.1.self_attn.k_proj.bias").reshape(1, 48 // 4)
    )
    run = evaluate.load_run(tmp_path / "run", cache_dir=cache_dir)
    restored = checkpoint.flatten_params(run.params)
    for key, value in params.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value), err_msg=key)


@pytest.mark.parametrize("name", ["llama_bias_gqa_linear", "qwen2_tied_gqa"])
def test_greedy_generation_equals_transformers_generate(name, tmp_path):
    """The imported model through our decode loop (KV cache, left padding) produces the token ids
    of transformers' greedy `generate` on the same weights, EOS included."""
    from jaxvlm import decoding

    family, kwargs = CONFIGS[name]
    hf = _save_hf(family, kwargs, tmp_path)
    model, params = _import(tmp_path)
    new, eos, pad = 8, 5, 0
    tokens = np.array(jax.random.randint(jax.random.key(3), (B, 7), 6, VOCAB), np.int32)
    mask = np.ones_like(tokens)
    tokens[1, :3], mask[1, :3] = pad, 0  # left padding
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


def test_a_sharded_checkpoint_imports_like_a_single_file(saved, tmp_path):
    """Tensors split over two shard files named by model.safetensors.index.json load the same."""
    from safetensors.numpy import save_file

    whole = HFCheckpoint(saved)
    tensors = {k: whole.take(k) for k in whole.keys()}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(saved / "config.json", sharded / "config.json")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file), metadata={"format": "pt"})
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    _, expected = _import(saved)
    _, params = _import(sharded)
    for key, value in flatten_params(expected).items():
        np.testing.assert_array_equal(flatten_params(params)[key], value, err_msg=key)

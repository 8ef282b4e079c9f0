"""LLaVA import from a saved Hugging Face directory: VLM logits equal to
`LlavaForConditionalGeneration`'s (an image per row, left padding), pixels and input_ids equal to
`LlavaProcessor`'s, strict keys, and one-line errors for what the importer refuses."""

import json
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from helpers import rewrite_safetensors

from jaxvlm import vlm
from jaxvlm.data import chat
from jaxvlm.data.preprocessing import ImagePreprocessing
from jaxvlm.data.tokenizer import Tokenizer
from jaxvlm.importers import CheckpointImportError, llava
from jaxvlm.importers.llama import architecture as llama_architecture
from jaxvlm.models import init_fn
from jaxvlm.param_paths import flatten_params, unflatten_params

B, VOCAB, IMAGE_ID, SIZE, PATCH = 2, 96, 95, 16, 4
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=SIZE,
    patch_size=PATCH,
)
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    initializer_range=0.3,
)
# name: (vision family and kwargs, text family and kwargs, LlavaConfig kwargs, scan_layers)
CONFIGS = {
    "clip_llama_default_untied": (
        ("clip", dict(hidden_act="quick_gelu")),
        ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
        dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
        True,
    ),
    "siglip_qwen2_full_tied": (
        ("siglip", dict()),
        ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
        dict(vision_feature_layer=-1, vision_feature_select_strategy="full"),
        False,
    ),
}


def _llava_config(name):
    import transformers

    (vision, vision_kwargs), (text, text_kwargs), top, _ = CONFIGS[name]
    vision_class = {
        "clip": transformers.CLIPVisionConfig,
        "siglip": transformers.SiglipVisionConfig,
    }
    text_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
    return transformers.LlavaConfig(
        vision_config=vision_class[vision](**VISION, **vision_kwargs),
        text_config=text_class[text](**TEXT, **text_kwargs),
        image_token_index=IMAGE_ID,
        attn_implementation="eager",
        **top,
    )


def _save_llava(name, directory):
    import transformers

    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(_llava_config(name)).eval()
    with torch.no_grad():  # random biases and norm scales: a missed one cannot pass by accident
        for key, p in model.named_parameters():
            if key.endswith("bias") or "norm" in key:
                p.add_(0.1 * torch.randn_like(p))
            elif "multi_modal_projector" in key:
                p.normal_(0.0, 0.3)  # image tokens that move the logits
    model.save_pretrained(directory)
    return model


def _import(directory, tiny_config, scan_layers=True, max_text_len=8):
    config = tiny_config("llava")
    llava.update_config(config, llava.vlm_config(directory))
    with config.unlocked():
        for block in ("encoder", "llm"):
            config[block].checkpoint = ""
            config[block].scan_layers = scan_layers
        config.data.max_text_len = max_text_len
    model = vlm.build_vlm(config)
    boxed = jax.eval_shape(init_fn(model, config), jax.random.key(0))
    expected = flatten_params(nn.unbox(boxed))
    return model, unflatten_params(llava.load_params(directory, config, expected)), config


def _tokens(num_image_tokens, pad=3):
    """Row 0: bos, 3 words, the image, 6 words; row 1 the same left-padded by `pad` (3 words
    fewer). Returns (tokens, mask, positions) int32[B, T]."""
    rng = np.random.default_rng(0)
    image = [IMAGE_ID] * num_image_tokens
    rows = [
        [1, *rng.integers(3, 90, 3), *image, *rng.integers(3, 90, 6)],
        [0] * pad + [1, *image, *rng.integers(3, 90, 6 + 3 - pad)],
    ]
    tokens = np.asarray(rows, np.int32)
    mask = (np.arange(tokens.shape[1])[None] >= np.asarray([[0], [pad]])).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path, tiny_config):
    hf = _save_llava(name, tmp_path)
    num_image_tokens = llava.processor(tmp_path).num_image_tokens
    tokens, mask, positions = _tokens(num_image_tokens)
    model, params, _ = _import(tmp_path, tiny_config, CONFIGS[name][3], tokens.shape[1])
    images = np.asarray(jax.random.normal(jax.random.key(1), (B, SIZE, SIZE, 3)), np.float32)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        ).logits.numpy()

    @jax.jit
    def logits(images):
        return model.apply(
            {"params": params},
            tokens,
            images[:, None],
            np.ones((B, 1), bool),
            mask=mask.astype(bool),
            positions=positions,
        ).logits

    with jax.default_matmul_precision("highest"):
        ours, other = np.asarray(logits(images)), np.asarray(logits(-images))
    real = mask.astype(bool)
    error = np.abs(ours[real] - ref[real]).max()
    assert error <= 1e-4 * max(1.0, np.abs(ref[real]).max())
    assert 1.0 < np.abs(ref).max() < 30.0  # not flat: the comparison decides something
    assert np.abs(other[real] - ours[real]).max() > 1e-2  # and the image takes part in it


def test_token_count_and_config_fields(tmp_path):
    _llava_config("clip_llama_default_untied").save_pretrained(tmp_path)
    overrides = llava.vlm_config(tmp_path)
    assert overrides["encoder"]["feature_layer"] == -2 and overrides["bridge"]["drop_class_token"]
    assert overrides["data"] == {"image_token_id": IMAGE_ID}
    assert llava.processor(tmp_path).num_image_tokens == (SIZE // PATCH) ** 2  # 17 - CLS
    _llava_config("siglip_qwen2_full_tied").save_pretrained(tmp_path)
    overrides = llava.vlm_config(tmp_path)
    assert overrides["llm"]["tie_embeddings"] and overrides["llm"]["qkv_bias"]
    assert not overrides["bridge"]["drop_class_token"] and overrides["encoder"]["pool"] == "map"
    assert overrides["preprocessing"]["resize"] == "squash"


def test_a_sparse_config_takes_transformers_defaults(tmp_path):
    """The llava-hf hub configs list only non-default text fields; transformers fills the rest."""
    import transformers

    _llava_config("clip_llama_default_untied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"] = {"model_type": "llama", "vocab_size": VOCAB, "rms_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = transformers.LlamaConfig(vocab_size=VOCAB, rms_norm_eps=1e-5).to_dict()
    expected = {"name": "llama", **llama_architecture(reference), "num_added_embeddings": 0}
    assert llava.vlm_config(tmp_path)["llm"] == expected


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava")
    _save_llava("clip_llama_default_untied", directory)
    return directory


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "llava")


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if "." in key:
            block, field = key.split(".")
            config[block][field] = value
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("vision_feature_layer", [-2, -1], r"vision_feature_layer=\[-2, -1\].*one layer only"),
        ("vision_feature_layer", 3, r"vision_feature_layer=3.*\[-3, 2\]"),
        ("projector_hidden_act", "relu", r"projector_hidden_act='relu'.*gelu"),
        ("vision_feature_select_strategy", "cls", r"vision_feature_select_strategy='cls'"),
        ("multimodal_projector_bias", False, r"multimodal_projector_bias=False"),
        ("text_config.model_type", "mistral", r"model_type='mistral'"),
        ("model_type", "llava_next", r"model_type='llava_next'.*llava"),
    ],
)
def test_unsupported_values_are_one_line_errors_naming_the_field(copy, key, value, message):
    _edit_config(copy, **{key: value})
    with pytest.raises(CheckpointImportError, match=message) as error:
        llava.vlm_config(copy)
    assert "\n" not in str(error.value)


def test_strict_key_accounting(copy, tiny_config):
    rewrite_safetensors(copy, lambda t: {**t, "multi_modal_projector.extra": np.ones(2)})
    with pytest.raises(CheckpointImportError, match=r"1 checkpoint tensors.*projector.extra"):
        _import(copy, tiny_config)
    rewrite_safetensors(copy, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up" not in k})
    with pytest.raises(CheckpointImportError, match=r"'language_model.model.layers.1.mlp.up_proj"):
        _import(copy, tiny_config)


def test_a_config_that_differs_from_the_checkpoint_is_named(saved, tiny_config):
    _, _, config = _import(saved, tiny_config)
    with config.unlocked():
        config.encoder.feature_layer = -1
    with pytest.raises(CheckpointImportError, match=r"\['encoder.feature_layer'\]"):
        llava.load_params(saved, config, {})


def test_the_transformers_4_key_layout_imports_the_same(saved, copy, tiny_config):
    def rename(tensors):
        def new(key):
            if key.startswith("language_model.model."):
                return "model.language_model." + key[len("language_model.model.") :]
            if key == "language_model.lm_head.weight":
                return "lm_head.weight"
            return "model." + key  # vision_tower., multi_modal_projector.

        return {new(k): v for k, v in tensors.items()}

    rewrite_safetensors(copy, rename)
    _, params, _ = _import(saved, tiny_config)
    _, renamed, _ = _import(copy, tiny_config)
    jax.tree.map(np.testing.assert_array_equal, params, renamed)


WORDS = ["<pad>", "<unk>", "<s>", "</s>", "a", "red", "circle", "what", "is", "this", "?", "USER:"]


def _save_processor(family, directory):
    """A LlavaProcessor (PIL image processor, tiny word-level tokenizer) beside its model config;
    returns it."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers, processors

    tokenizer = tokenizers.Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([tokenizers.AddedToken("<image>", special=True, normalized=False)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 2)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    name = {"clip": "clip_llama_default_untied", "siglip": "siglip_qwen2_full_tied"}[family]
    config = _llava_config(name)
    config.image_token_index = len(WORDS)
    config.save_pretrained(directory)
    if family == "clip":
        images = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
        )
        extra = dict(vision_feature_select_strategy="default", num_additional_image_tokens=1)
    else:
        images = transformers.SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
        extra = dict(vision_feature_select_strategy="full", num_additional_image_tokens=0)
    processor = transformers.LlavaProcessor(
        image_processor=images, tokenizer=fast, patch_size=PATCH, **extra
    )
    processor.save_pretrained(directory)
    return processor


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_pixels_and_input_ids_match_llava_processor(family, tmp_path):
    hf = _save_processor(family, tmp_path)
    spec = llava.processor(tmp_path)
    preprocessing = ImagePreprocessing.from_config(spec.preprocessing)
    tokenizer = Tokenizer.from_directory(str(tmp_path))
    rng = np.random.default_rng(0)
    # (30, 47), (64, 20): shortest-edge sizes where floor and round agree (see the xfail below).
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(30, 47, 3), (16, 16, 3)]]
    images.append(rng.integers(0, 256, (64, 20, 3), dtype=np.uint8))
    prompts = [("USER: <image> what is this ?", 1), ("<image> a red circle <image> what", 2)]
    used = 0
    for prompt, count in prompts:
        batch = images[used : used + count]
        used += count
        out = hf(images=batch, text=[prompt], return_tensors="np")
        ours = np.stack([preprocessing(image) for image in batch])
        np.testing.assert_allclose(ours, out["pixel_values"].transpose(0, 2, 3, 1), atol=1e-5)
        want = out["input_ids"][0].tolist()
        assert tokenizer.encode(spec.expand(prompt), add_special_tokens=True) == want
        # The generate path (--no-template) expands ids, not text: the same ids.
        ids = chat.encode_prompt(
            tokenizer,
            None,
            [{"role": "user", "content": prompt}],
            num_images=count,
            image_token_id=len(WORDS),
            tokens_per_image=spec.num_image_tokens,
        )
        assert ids.tolist() == want
    assert spec.num_image_tokens == (SIZE // PATCH) ** 2


def test_shortest_edge_resize_floors_like_transformers(tmp_path):
    hf = _save_processor("clip", tmp_path)
    preprocessing = ImagePreprocessing.from_config(llava.processor(tmp_path).preprocessing)
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = hf.image_processor(images=[image], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocessing(image), out[0].transpose(1, 2, 0), atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(crop_size={"height": 8, "width": 8}), r"crop_size=.*center crop of 16x16"),
        (dict(do_pad=True), r"do_pad=True"),
        (dict(resample=5), r"resample=5"),
        (dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), r"image_size"),
        (dict(patch_size_override=8), r"processor gives 4 image tokens.*projector gives 16"),
    ],
)
def test_processor_settings_we_cannot_express_are_named(tmp_path, change, message):
    _save_processor("clip", tmp_path)
    path = tmp_path / "processor_config.json"
    settings = json.loads(path.read_text())
    if "patch_size_override" in change:
        settings["patch_size"] = change["patch_size_override"]
    else:
        settings["image_processor"].update(change)
    path.write_text(json.dumps(settings))
    with pytest.raises(CheckpointImportError, match=message) as error:
        llava.processor(tmp_path)
    assert "\n" not in str(error.value) and "processor_config.json" in str(error.value)


def test_preprocessor_config_json_and_rescale_folding(tmp_path):
    """The older layout (image settings in preprocessor_config.json) reads the same; a rescale
    factor other than 1/255 folds into mean and std."""
    hf = _save_processor("clip", tmp_path)
    path = tmp_path / "processor_config.json"
    settings = json.loads(path.read_text())
    image_settings = settings.pop("image_processor")
    path.write_text(json.dumps(settings))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_settings))
    spec = llava.processor(tmp_path)
    image = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    hf.image_processor.rescale_factor = 1 / 127.5
    image_settings["rescale_factor"] = 1 / 127.5
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_settings))
    folded = ImagePreprocessing.from_config(llava.processor(tmp_path).preprocessing)
    out = hf.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(folded(image), out.transpose(1, 2, 0), atol=1e-5)
    assert spec.preprocessing["mean"] != folded.mean


def test_convert_then_generate_equals_transformers_generate(
    tmp_path, cache_dir, tiny_config, capsys
):
    """`convert --from-hf` a LLaVA directory (model + processor files), then generate: the greedy
    ids of transformers' `generate` on the processor's inputs, through a workdir and through
    `--checkpoint` (converted in memory)."""
    import transformers

    from jaxvlm import convert, evaluate, generate

    directory = tmp_path / "llava"
    processor = _save_processor("clip", directory)
    config = _llava_config("clip_llama_default_untied")
    config.image_token_index = len(WORDS)  # the processor's <image>
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if "multi_modal_projector" in key:
                p.normal_(0.0, 0.3)
    hf.save_pretrained(directory)
    image = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    prompt = "USER: <image> what is this ?"
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        expected = hf.generate(
            **inputs, max_new_tokens=5, do_sample=False, eos_token_id=3, pad_token_id=0
        )[0, inputs["input_ids"].shape[1] :].tolist()
    workdir = convert.convert(directory, tmp_path / "converted", cache_dir=cache_dir)
    for run in (
        evaluate.load_run(workdir, cache_dir=cache_dir),
        convert.load_imported(directory),
    ):
        assert run.config.model == "vlm" and run.config.template.template == ""
        [result] = generate.answer(run, [prompt], [[image]], max_new_tokens=5)
        assert result.token_ids == expected
    with pytest.raises(ValueError, match="0 image placeholders for 1 images"):
        generate.answer(run, ["what is this ?"], [[image]], max_new_tokens=5)
    # evaluate --checkpoint scores it on a world (the session's tiny one), blind baseline beside.
    from jaxvlm import data

    world = data.open_world(tiny_config("llava").data.world, cache_dir)
    args = ["--checkpoint", str(directory), "--data", str(world.path), "--json"]
    args += ["--config.evals.vqa.num_examples=3", "--config.evals.caption.num_examples=2"]
    evaluate.main([*args, "--cache-dir", str(cache_dir)])
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == str(directory) and result["step"] == 0
    assert {"vqa_accuracy", "cider"} <= set(result["metrics"]) and result["blind"]

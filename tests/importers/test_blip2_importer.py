"""BLIP-2 import from a saved Hugging Face directory: VLM logits and beam-5 ids equal to
`Blip2ForConditionalGeneration`'s (OPT), ITC similarities and ITM logits equal to
`Blip2ForImageTextRetrieval`'s, pixels and input_ids equal to `Blip2Processor`'s, strict keys,
and one-line errors for what the importer refuses (FlanT5 among them)."""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import rewrite_safetensors

from jaxvlm import vlm
from jaxvlm.bridges.qformer import max_over_queries
from jaxvlm.importers import CheckpointImportError, blip2
from jaxvlm.models import init_fn
from jaxvlm.param_paths import flatten_params, unflatten_params

B, SIZE, PATCH, QUERIES = 2, 16, 4, 4
VOCAB, IMAGE_ID, BOS, PAD = 96, 95, 2, 1  # OPT's
QFORMER_VOCAB, CLS = 128, 101  # BERT's [CLS]
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=SIZE,
    patch_size=PATCH,
)
QFORMER = dict(
    vocab_size=QFORMER_VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=32,
)
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    ffn_dim=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,  # generate pads prompts to 64: room for the new tokens
    bos_token_id=BOS,
    eos_token_id=BOS,
    pad_token_id=PAD,
)
# name: (architecture, vision kwargs, Q-Former kwargs, OPT kwargs, Blip2Config kwargs, scan)
CONFIGS = {
    "generation_tied_every_other": (
        "Blip2ForConditionalGeneration",
        dict(),
        dict(cross_attention_frequency=2),
        dict(tie_word_embeddings=True),
        dict(image_token_index=IMAGE_ID),
        True,
    ),
    "generation_untied_every_layer_text_ffn": (
        "Blip2ForConditionalGeneration",
        dict(hidden_act="quick_gelu", layer_norm_eps=1e-5),
        dict(cross_attention_frequency=1, use_qformer_text_input=True, hidden_act="gelu_new"),
        dict(tie_word_embeddings=False),
        dict(image_token_index=IMAGE_ID),
        False,
    ),
    "retrieval_no_image_tokens": (
        "Blip2ForImageTextRetrieval",
        dict(),
        dict(cross_attention_frequency=2, use_qformer_text_input=True),
        dict(),
        dict(image_text_hidden_size=16),
        True,
    ),
    "retrieval_image_tokens_every_layer": (
        "Blip2ForImageTextRetrieval",
        dict(layer_norm_eps=1e-5),
        dict(cross_attention_frequency=1, use_qformer_text_input=True),
        dict(),
        dict(image_text_hidden_size=8, image_token_index=QFORMER_VOCAB - 1),
        False,
    ),
}
GENERATION = [name for name in CONFIGS if name.startswith("generation")]
RETRIEVAL = [name for name in CONFIGS if name.startswith("retrieval")]


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _blip2_config(name):
    import transformers

    _, vision, qformer, text, top, _ = CONFIGS[name]
    return transformers.Blip2Config(
        vision_config=transformers.Blip2VisionConfig(**VISION, **vision).to_dict(),
        qformer_config=transformers.Blip2QFormerConfig(**QFORMER, **qformer).to_dict(),
        text_config=transformers.OPTConfig(**TEXT, **text).to_dict(),
        num_query_tokens=QUERIES,
        attn_implementation="eager",
        **top,
    )


def _save_blip2(name, directory):
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, CONFIGS[name][0])(_blip2_config(name)).eval()
    with torch.no_grad():  # HF zero-inits the queries (1e-10 std for the ViT's positions): redraw
        for key, p in model.named_parameters():
            if "norm" in key.lower() and key.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif key.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 1.0 if key == "query_tokens" else 0.25)
    model.save_pretrained(directory)
    return model


def _import(directory, tiny_config, name):
    """(model, params, config): imported; the parameters no tensor fills (`fresh_parameters`,
    unused by these forwards) are zeros here (initialising them costs a 15 s compile)."""
    stage = 1 if name in RETRIEVAL else 2
    config = tiny_config("blip2", stage=stage)
    blip2.update_config(config, blip2.vlm_config(directory))
    with config.unlocked():
        for block in ("encoder", "bridge", "llm"):
            config[block].checkpoint = ""
            if "scan_layers" in config[block]:
                config[block].scan_layers = CONFIGS[name][5]
        config.data.max_text_len = 16
    model = vlm.build_vlm(config)
    expected = flatten_params(nn.unbox(jax.eval_shape(init_fn(model, config), jax.random.key(0))))
    loaded = blip2.load_params(directory, config, expected)
    fresh = blip2.fresh_parameters(directory, expected)
    assert sorted(set(expected) - set(loaded)) == fresh
    zeros = {k: np.zeros(expected[k].shape, expected[k].dtype) for k in fresh}
    return model, unflatten_params({**zeros, **loaded}), config


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_config):
    """`imported(name)` → (directory, HF model, our model, params, config), built once per name."""
    built = {}

    def get(name):
        if name not in built:
            directory = tmp_path_factory.mktemp(name)
            hf = _save_blip2(name, directory)
            built[name] = (directory, hf, *_import(directory, tiny_config, name))
        return built[name]

    return get


def _images(seed=1):
    return np.asarray(jax.random.normal(jax.random.key(seed), (B, SIZE, SIZE, 3)), np.float32)


def _prompts(pad=2):
    """Blip2Processor's layout: Q image tokens, then BOS and the text; row 1's text is
    left-padded by `pad` after the image tokens (as the processor pads). int32[B, T] ×3."""
    rng = np.random.default_rng(0)
    image = [IMAGE_ID] * QUERIES
    rows = [
        [*image, BOS, *rng.integers(3, 90, 5)],
        [*image, *[PAD] * pad, BOS, *rng.integers(3, 90, 5 - pad)],
    ]
    tokens = np.asarray(rows, np.int32)
    mask = (tokens != PAD).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


@pytest.mark.parametrize("name", GENERATION)
def test_generation_logits_match_transformers(name, imported):
    _, hf, model, params, _ = imported(name)
    tokens, mask, positions = _prompts()
    images = _images()
    with torch.no_grad():
        ref = hf(
            pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
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

    ours, other = np.asarray(logits(images)), np.asarray(logits(-images))
    real = mask.astype(bool)
    error = np.abs(ours[real] - ref[real]).max()
    assert error <= 1e-4 * max(1.0, np.abs(ref[real]).max()), error
    assert 1.0 < np.abs(ref).max() < 30.0  # not flat: the comparison decides something
    assert np.abs(other[real] - ours[real]).max() > 1e-2  # and the image takes part in it


def _texts():
    """Q-Former text as BERT writes it ([CLS] first), right-padded: int32[3, 6] ×2."""
    rng = np.random.default_rng(2)
    lengths = [6, 4, 5]
    tokens = np.zeros((3, 6), np.int32)
    for row, length in enumerate(lengths):
        tokens[row, :length] = [CLS, *rng.integers(3, 100, length - 1)]
    return tokens, (tokens != 0).astype(np.int32)


@pytest.mark.parametrize("name", RETRIEVAL)
def test_retrieval_itc_and_itm_match_transformers(name, imported):
    _, hf, model, params, _ = imported(name)
    tokens, mask = _texts()
    images = _images()
    hf_tokens, hf_mask = tokens, mask
    if hf.config.image_token_index is not None:  # HF then drops the processor's image tokens
        image = np.full((3, QUERIES), hf.config.image_token_index, np.int32)
        hf_tokens = np.concatenate([image, tokens], axis=1)
        hf_mask = np.concatenate([np.ones_like(image), mask], axis=1)
    pixels = torch.tensor(images.transpose(0, 3, 1, 2))
    with torch.no_grad():
        itc = hf(pixels, torch.tensor(hf_tokens), torch.tensor(hf_mask))
        itm = hf(
            pixels,
            torch.tensor(hf_tokens[:B]),
            torch.tensor(hf_mask[:B]),
            use_image_text_matching_head=True,
        ).logits_per_image.numpy()

    def apply(method, *args):
        args = [jnp.asarray(a) for a in args]
        return np.asarray(model.apply({"params": params}, *args, method=method))

    image_embeddings = apply(vlm.VLM.retrieval_image_embeddings, images)
    text_embeddings = apply(vlm.VLM.retrieval_text_embeddings, tokens, mask)
    features = apply(vlm.VLM.retrieval_image_features, images)
    ours_itm = apply(
        lambda module, *args: module.bridge.itm_logits(*args), features, tokens[:B], mask[:B]
    )
    matched = apply(vlm.VLM.retrieval_match_score, features, tokens[:B], mask[:B])
    np.testing.assert_allclose(matched, ours_itm[:, 1])
    np.testing.assert_allclose(image_embeddings, itc.image_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(text_embeddings, itc.text_embeds.numpy(), atol=1e-4)
    similarity = np.asarray(max_over_queries(image_embeddings, text_embeddings))
    np.testing.assert_allclose(similarity, itc.logits_per_image.numpy(), atol=1e-4)
    assert np.ptp(similarity) > 0.05  # images and texts differ: the comparison decides something
    assert np.abs(ours_itm - itm).max() <= 1e-4 * max(1.0, np.abs(itm).max())
    assert np.abs(itm[:, 1] - itm[:, 0]).max() > 0.1


def test_beam_search_ids_equal_transformers_generate(imported):
    """Beam 5, length penalty -1 (BLIP-2's VQA decoding) through `predict.generate_fn`: the ids
    of transformers' `Blip2ForConditionalGeneration.generate`, with an EOS the model emits."""
    from jaxvlm import predict, sharding
    from jaxvlm.decoding import Decoding

    _, hf, model, params, _ = imported(GENERATION[0])
    tokens, mask, _ = _prompts()
    images = _images()
    new_tokens = 6

    def reference(eos, **kwargs):
        with torch.no_grad():
            out = hf.generate(
                pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
                input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=PAD,
                **kwargs,
            )[:, tokens.shape[1] :].numpy()
        return np.pad(out, ((0, 0), (0, new_tokens - out.shape[1])), constant_values=PAD)

    eos = int(reference(None)[0, 2])  # a token greedy emits early: hypotheses finish
    expected = reference(eos, num_beams=5, length_penalty=-1.0)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    batch = dict(tokens=tokens, mask=mask, images=images[:, None], image_mask=np.ones((B, 1), bool))
    output = predict.generate_fn(model, mesh)(
        params,
        batch,
        max_new_tokens=new_tokens,
        eos_id=eos,
        pad_id=PAD,
        decoding=Decoding(num_beams=5, length_penalty=-1.0),
    )
    np.testing.assert_array_equal(np.asarray(output.tokens), expected)
    assert (expected == eos).any()


def test_fresh_parameters_and_config_fields(imported):
    generation, retrieval = imported(GENERATION[0])[0], imported(RETRIEVAL[0])[0]
    overrides = blip2.vlm_config(generation)
    assert overrides["encoder"]["feature_layer"] == -1 and not overrides["encoder"]["pre_norm"]
    assert overrides["llm"]["name"] == "opt" and overrides["data"] == {"image_token_id": IMAGE_ID}
    assert overrides["bridge"]["cls_token_id"] == CLS
    assert overrides["preprocessing"]["resize"] == "squash"
    expected = {
        "bridge/temperature": (),
        "bridge/word_embeddings/embedding": (1, 1),
        "bridge/layers_0/feed_forward/mlp/fc1/kernel": (1, 1),
        "bridge/layers_0/feed_forward_query/mlp/fc1/kernel": (1, 1),
        "llm/embed_tokens/embedding": (1, 1),
    }
    assert blip2.fresh_parameters(generation, expected) == [
        "bridge/layers_0/feed_forward/mlp/fc1/kernel",
        "bridge/temperature",
        "bridge/word_embeddings/embedding",
    ]
    assert blip2.vlm_config(retrieval)["llm"] == {"name": "none"}
    assert blip2.fresh_parameters(retrieval, expected) == ["bridge/temperature"]


@pytest.fixture(scope="module")
def saved(imported):
    return imported(GENERATION[0])[0]


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "blip2")


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if "." in key:
            block, field = key.split(".")
            config[block][field] = value
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def test_a_t5_language_model_is_refused_naming_the_field(tmp_path):
    import transformers

    config = transformers.Blip2Config(
        vision_config=VISION,
        qformer_config=QFORMER,
        text_config=transformers.T5Config(vocab_size=VOCAB, d_model=32, num_layers=1).to_dict(),
        num_query_tokens=QUERIES,
        image_token_index=IMAGE_ID,
    )
    config.save_pretrained(tmp_path)
    message = r"^text_config.model_type='t5': encoder-decoder BLIP-2 needs .*supported: opt"
    with pytest.raises(CheckpointImportError, match=message) as error:
        blip2.vlm_config(tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("image_token_index", None, r"image_token_index=None.*image tokens"),
        ("image_token_index", 200, r"image_token_index=200.*vocab_size=96"),
        ("architectures", ["Blip2VisionModel"], r"architectures=\['Blip2VisionModel'\]"),
        ("text_config.model_type", "llama", r"text_config.model_type='llama'.*opt"),
        ("vision_config.qkv_bias", False, r"vision_config.qkv_bias=False"),
        ("vision_config.patch_size", [4, 2], r"vision_config.patch_size=\[4, 2\]"),
        ("qformer_config.hidden_act", "tanh", r"qformer_config.hidden_act='tanh'"),
        ("text_config.word_embed_proj_dim", 16, r"word_embed_proj_dim=16"),
        ("model_type", "instructblip", r"model_type='instructblip'"),
    ],
)
def test_unsupported_values_are_one_line_errors_naming_the_field(copy, key, value, message):
    _edit_config(copy, **{key: value})
    with pytest.raises(CheckpointImportError, match=message) as error:
        blip2.vlm_config(copy)
    assert "\n" not in str(error.value)


def test_strict_key_accounting(copy, tiny_config):
    name = "generation_tied_every_other"
    rewrite_safetensors(copy, lambda t: {**t, "qformer.extra.weight": np.ones(2, np.float32)})
    with pytest.raises(CheckpointImportError, match=r"1 checkpoint tensors.*qformer.extra.weight"):
        _import(copy, tiny_config, name)
    missing = "qformer.encoder.layer.1.output_query.dense.weight"
    rewrite_safetensors(copy, lambda t: {k: v for k, v in t.items() if k != missing})
    with pytest.raises(CheckpointImportError, match=rf"tensor '{missing}' is missing"):
        _import(copy, tiny_config, name)


def test_a_config_that_differs_from_the_checkpoint_is_named(imported):
    saved, *_, config = imported(GENERATION[0])
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.bridge.cross_attention_frequency = 1
    with pytest.raises(CheckpointImportError, match=r"\['bridge.cross_attention_frequency'\]"):
        blip2.load_params(saved, config, {})


# OPT's special ids: <pad> 1, </s> 2 (BOS and EOS).
WORDS = ["<unk>", "<pad>", "</s>", "a", "red", "circle", "what", "is", "this", "?", "Question:"]


def _save_processor(directory):
    """A Blip2Processor (PIL image processor, a word-level tokenizer with BOS `</s>`) beside the
    model config; `<image>` is the token the processor adds, id len(WORDS). Returns it."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers, processors

    tokenizer = tokenizers.Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", BOS)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>"
    )
    images = transformers.BlipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    processor = transformers.Blip2Processor(images, fast, num_query_tokens=QUERIES)
    config = _blip2_config("generation_tied_every_other")
    config.image_token_index = len(WORDS)
    config.save_pretrained(directory)
    processor.save_pretrained(directory)
    return processor


def test_pixels_and_input_ids_match_blip2_processor(tmp_path):
    from jaxvlm.data.preprocessing import ImagePreprocessing
    from jaxvlm.data.tokenizer import Tokenizer

    hf = _save_processor(tmp_path)
    spec = blip2.processor(tmp_path)
    assert spec.num_image_tokens == QUERIES and spec.image_token == "<image>"
    preprocessing = ImagePreprocessing.from_config(spec.preprocessing)
    tokenizer = Tokenizer.from_directory(str(tmp_path))
    image = np.random.default_rng(0).integers(0, 256, (30, 47, 3), dtype=np.uint8)
    prompt = "Question: what is this ?"
    out = hf(images=[image], text=[prompt], return_tensors="np")
    np.testing.assert_allclose(
        preprocessing(image), out["pixel_values"][0].transpose(1, 2, 0), atol=1e-5
    )
    assert spec.encode(tokenizer, prompt, len(WORDS)) == out["input_ids"][0].tolist()
    settings = json.loads((tmp_path / "processor_config.json").read_text())
    settings["num_query_tokens"] = QUERIES + 1
    (tmp_path / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(
        CheckpointImportError, match=r"num_query_tokens=5 but config.json has num_query_tokens=4"
    ):
        blip2.processor(tmp_path)


@pytest.mark.slow
def test_generate_from_a_blip2_directory_equals_transformers(tmp_path, capsys):
    """`python -m jaxvlm.generate --checkpoint DIR` (converted in memory, fresh text side
    initialised): beam-5 ids of transformers' `generate` on `Blip2Processor`'s inputs; the
    prompt laid out by the imported template as the processor does. `--no-template` reads the
    prompt as `tokenizer(text)`, its `<image>` where written."""
    from PIL import Image

    from jaxvlm import convert, generate
    from jaxvlm.decoding import Decoding

    processor = _save_processor(tmp_path)
    name = "generation_tied_every_other"
    CONFIGS["_processor"] = (*CONFIGS[name][:4], dict(image_token_index=len(WORDS)), True)
    try:
        hf = _save_blip2("_processor", tmp_path)
    finally:
        del CONFIGS["_processor"]
    image = np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    prompt = "Question: what is this ? Answer:"
    beams = dict(num_beams=5, length_penalty=-1.0)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=PAD, **beams)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    expected = expected[: expected.index(BOS) + 1] if BOS in expected else expected
    args = ["--checkpoint", str(tmp_path), "--image", str(tmp_path / "a.png"), "--json"]
    args += ["--prompt", prompt, "--max-new-tokens", "5", "--num-beams", "5"]
    generate.main([*args, "--length-penalty", "-1"])
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected
    assert len(set(expected)) > 1  # not one repeated token: the comparison decides something
    run = convert.load_imported(tmp_path)
    assert run.config.llm.name == "opt" and run.config.template.template
    [result] = generate.answer(
        run,
        ["<image> " + prompt],
        [[image]],
        use_template=False,
        max_new_tokens=5,
        decoding=Decoding(**beams),
    )
    assert 1 <= len(result.token_ids) <= 5

"""Every config builds; typos are errors that name the key; nothing is written before validation."""

import jax
import pytest
from helpers import CONFIGS

from jaxvlm import config_utils, models
from jaxvlm.importers import gguf as gguf_importer

RECIPES = [
    ("backbones_pretrain", "model=vit"),
    ("backbones_pretrain", "model=lm"),
    ("backbones_pretrain", "model=t5"),
    ("llava", "stage=1"),
    ("llava", "stage=2"),
    ("blip2", "stage=1"),
    ("blip2", "stage=2"),
    ("blip2", "stage=vqa"),
    ("blip2", "stage=caption"),
    ("blip2", "stage=2,llm=t5"),
    ("blip2", "stage=vqa,llm=t5"),
]


@pytest.mark.parametrize("recipe,arg", RECIPES)
@pytest.mark.parametrize("size", ["tiny", "default", "paper"])
def test_every_config_builds(recipe, arg, size):
    config = config_utils.load_config(f"{CONFIGS / recipe}.py:{arg},size={size}")
    model = models.build_model(config)
    params = jax.eval_shape(models.init_fn(model, config), jax.random.key(0))
    assert jax.tree.leaves(params)


def test_paper_sizes_are_the_papers():
    vit = config_utils.load_config(f"{CONFIGS}/backbones_pretrain.py:model=vit,size=paper")
    assert (vit.encoder.width, vit.encoder.depth, vit.encoder.patch_size) == (1024, 24, 14)
    assert vit.encoder.image_size == 336
    lm = config_utils.load_config(f"{CONFIGS}/backbones_pretrain.py:model=lm,size=paper")
    assert (lm.llm.dim, lm.llm.depth, lm.llm.vocab_size) == (4096, 32, 32000)


def test_llava_paper_recipe():
    from jaxvlm import vlm

    stage1 = config_utils.load_config(f"{CONFIGS}/llava.py:stage=1,size=paper")
    stage2 = config_utils.load_config(f"{CONFIGS}/llava.py:stage=2,size=paper")
    assert vlm.tokens_per_image(stage1) == 576  # LLaVA-1.5: 24 × 24 patches at 336 px
    assert stage1.encoder.feature_layer == -2 and stage1.bridge.projector == "mlp2x_gelu"
    assert (stage1.optimizer.learning_rate, stage1.data.batch_size) == (2e-3, 128)
    assert (stage2.optimizer.learning_rate, stage2.data.batch_size) == (2e-5, 32)
    assert stage1.trainable == ("bridge/.*",) and stage2.trainable == ("bridge/.*", "llm/.*")
    assert stage2.data.instruction_mix.vqa == 0 and stage2.template.system_message.startswith(
        "A chat"
    )


def test_blip2_paper_recipe():
    """papers.md §1 under size=paper: stage 1, stage 2 into OPT-2.7B, the protocol's fine-tunes."""
    load = lambda stage: config_utils.load_config(f"{CONFIGS}/blip2.py:stage={stage},size=paper")
    stage1, stage2, vqa, caption = map(load, ("1", "2", "vqa", "caption"))
    bridge = stage1.bridge
    assert (bridge.num_queries, bridge.dim, bridge.depth, bridge.embed_dim) == (32, 768, 12, 256)
    assert bridge.cross_attention_frequency == 2 and bridge.temperature_init == 0.07
    assert stage1.encoder.feature_layer == -2 and stage1.data.max_text_len == 32
    assert (stage1.data.batch_size, stage1.train.num_steps) == (2320, 250_000)
    assert (stage2.data.batch_size, stage2.train.num_steps) == (1920, 80_000)
    for config in (stage1, stage2):
        assert (config.optimizer.b2, config.optimizer.weight_decay) == (0.98, 0.05)
        assert (config.optimizer.learning_rate, config.optimizer.warmup_steps) == (1e-4, 2000)
    assert stage2.optimizer.min_learning_rate == 5e-5
    assert dict(stage1.loss) == dict(
        itc=1.0, itm=1.0, itg=1.0, itc_label_smoothing=0.1, itg_label_smoothing=0.1
    )
    assert stage1.evals.retrieval.rerank == "itm" and stage1.evals.retrieval.rerank_k == 128
    assert (stage2.evals.vqa.num_beams, stage2.evals.vqa.length_penalty) == (5, -1.0)
    assert stage2.evals.vqa.max_new_tokens == 10
    assert vqa.bridge.read_prompt and not stage2.bridge.read_prompt
    for config in (vqa, caption):  # the LLM frozen, the Q-Former and the ViT trained
        assert "encoder/.*" in config.trainable and not any("llm" in p for p in config.trainable)
    assert caption.evals.caption.prompt == caption.data.caption_prompts[0] == "a photo of"


def test_blip2_encoder_decoder_stage2_is_flant5_with_the_prefix_lm():
    """papers.md §1: stage 2 into FlanT5-XL (size=paper) or the world T5, the prefix-LM split,
    and FlanT5's zero-shot prompt; its VQA fine-tune gives the decoder the whole answer."""
    load = lambda arg: config_utils.load_config(f"{CONFIGS}/blip2.py:{arg}")
    paper = load("stage=2,llm=t5,size=paper")
    assert paper.llm.name == "t5" and paper.llm.checkpoint == ""
    assert (paper.llm.dim, paper.llm.depth, paper.llm.mlp_dim, paper.llm.vocab_size) == (
        2048,
        24,
        5120,
        32128,
    )
    assert paper.llm.gated_mlp and not paper.llm.tie_embeddings
    world = load("stage=2,llm=t5,size=default")
    assert world.llm.checkpoint.startswith("backbone:") and "model=t5" in world.llm.checkpoint
    for config in (paper, world):
        assert config.objective == "prefix_lm" and config.data.prefix_split == "random"
        assert config.evals.vqa.prompt == "Question: {question} Short answer:"
        assert (config.evals.vqa.num_beams, config.evals.vqa.length_penalty) == (5, -1.0)
    vqa = load("stage=vqa,llm=t5,size=default")
    assert vqa.data.prefix_split == "none" and vqa.data.vqa_prompt == world.evals.vqa.prompt
    with pytest.raises(config_utils.ConfigError, match="llm=gpt"):
        load("stage=2,llm=gpt")


def test_an_objective_that_does_not_fit_the_llm_is_an_error(tiny_config):
    config = tiny_config("blip2", stage=2, llm="t5")
    with config.unlocked():
        config.objective = "lm"
    with pytest.raises(
        config_utils.ConfigError, match="encoder-decoder LLM trains with objective 'prefix_lm'"
    ):
        config_utils.validate(config)
    config = tiny_config("blip2", stage=2)
    with config.unlocked():
        config.objective = "prefix_lm"
    with pytest.raises(
        config_utils.ConfigError, match="decoder-only LLM trains with objective 'lm'"
    ):
        config_utils.validate(config)
    config = tiny_config("backbones_pretrain", model="lm")
    with config.unlocked():
        config.model = "seq2seq_lm"
    with pytest.raises(config_utils.ConfigError, match="needs an encoder-decoder config.llm"):
        models.build_model(config)


def test_misspelt_override_raises_naming_the_key():
    with pytest.raises(config_utils.ConfigError, match="optimizer.learnin_rate"):
        config_utils.load_config(
            f"{CONFIGS}/backbones_pretrain.py:size=tiny", {"optimizer.learnin_rate": 1.0}
        )
    config = config_utils.load_config(f"{CONFIGS}/backbones_pretrain.py:size=tiny")
    with pytest.raises(AttributeError):
        config.optimizer.learnin_rate = 1.0  # locked


def test_unknown_config_argument_lists_the_allowed_ones():
    with pytest.raises(config_utils.ConfigError, match="allowed: model, size"):
        config_utils.load_config(f"{CONFIGS}/backbones_pretrain.py:sise=tiny")
    with pytest.raises(config_utils.ConfigError, match="size='huge'"):
        config_utils.load_config(f"{CONFIGS}/backbones_pretrain.py:size=huge")


def test_unknown_component_field_names_the_key():
    with pytest.raises(Exception, match="config.llm.not_a_field"):
        config = config_utils.load_config(f"{CONFIGS}/backbones_pretrain.py:model=lm,size=tiny")
        with config.unlocked():
            config.llm.not_a_field = 3
        config_utils.validate(config)


def test_cross_field_errors_name_the_key():
    config = config_utils.load_config(f"{CONFIGS}/backbones_pretrain.py:model=lm,size=tiny")
    config.train.grad_accum_steps = 3
    with pytest.raises(config_utils.ConfigError, match="grad_accum_steps"):
        config_utils.validate(config)


def test_train_cli_typo_fails_before_writing(tmp_path, capsys):
    from jaxvlm import cli

    workdir = tmp_path / "never_created"
    with pytest.raises(SystemExit) as exit_info:
        cli.train_main(
            [
                f"--config={CONFIGS}/backbones_pretrain.py:model=lm,size=tiny",
                f"--workdir={workdir}",
                "--config.optimizer.learnin_rate=0.1",
            ]
        )
    assert exit_info.value.code != 0
    assert "learnin_rate" in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.parametrize(
    "override,match",
    [
        ({"train.checkpoint_every": 0}, "checkpoint_every"),
        ({"evals.perplexity.type": "bleu"}, "evals.perplexity.type"),
        ({"evals.perplexity.split": "tset"}, "evals.perplexity.split"),
        ({"data.augment": "blip3"}, "data.augment='blip3'; allowed: none, blip2"),
        ({"data.augment": "blip2"}, "applies to the captions task only"),  # a text task
    ],
)
def test_bad_steps_and_evaluators_are_config_errors(override, match):
    with pytest.raises(config_utils.ConfigError, match=match):
        config_utils.load_config(f"{CONFIGS}/backbones_pretrain.py:model=lm,size=tiny", override)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"evals.retrieval.rerank": "itc"}, "evals.retrieval.rerank='itc'; allowed: none, itm"),
        ({"evals.retrieval.rerank_k": 0}, "evals.retrieval.rerank_k=0 must be >= 1"),
        ({"data.image_position": "last"}, "image_position='last'; allowed: random, first"),
    ],
)
def test_bad_retrieval_rerank_and_image_position_are_config_errors(override, match):
    with pytest.raises(config_utils.ConfigError, match=match):
        config_utils.load_config(f"{CONFIGS}/blip2.py:stage=1,size=tiny", override)


@pytest.mark.parametrize("llm", ["llama", "opt"])
def test_imported_config_builds(llm):
    """configs/imported.py (what `convert` fills from a checkpoint) validates and builds."""
    config = config_utils.load_config(f"{CONFIGS / 'imported'}.py:llm={llm}")
    assert config.data.tokenizer == "llm" and config.template.template == "from_tokenizer"
    params = jax.eval_shape(models.init_fn(models.build_model(config), config), jax.random.key(0))
    assert jax.tree.leaves(params)


@pytest.mark.skipif(
    gguf_importer.smollm2_path() is None,
    reason=f"needs the SmolLM2 GGUF: {gguf_importer.SMOLLM2_INSTALL}",
)
def test_llava_into_smollm2_uses_its_tokenizer_template_and_an_added_image_token():
    from jaxvlm import importers, initialization, vlm
    from jaxvlm.data import chat

    config = config_utils.load_config(f"{CONFIGS / 'llava'}.py:stage=2,llm=smollm2_135m")
    assert config.trainable == ("bridge/.*",)  # the real LLM stays frozen
    importers.resolve_architectures(config)
    tokenizer = initialization.run_tokenizer(config)
    initialization.resolve_template(config, tokenizer)
    assert tokenizer.token_to_id("<image>") == config.data.image_token_id == 49152
    assert config.template.template.startswith("{% for message in messages %}")
    template = vlm.conversation_format(config, tokenizer).template
    messages = [
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "red"},
    ]
    encoded = chat.encode_conversation(
        tokenizer, template, messages, image_token_id=49152, tokens_per_image=4
    )
    assert (encoded.ids == 49152).sum() == 4
    answer = encoded.ids[encoded.loss_mask.astype(bool)]
    assert tokenizer.decode(answer, skip_special_tokens=False) == "red<|im_end|>\n"


def test_a_config_saved_before_later_fields_existed_still_loads():
    """Saved runs predate some base_config fields; evaluate fills them with today's defaults."""
    from jaxvlm import evaluate

    current = config_utils.load_config(f"{CONFIGS}/llava.py:stage=2,size=tiny").to_dict()
    saved = {k: v for k, v in current.items() if k != "loss"}
    saved["data"] = {k: v for k, v in current["data"].items() if k != "caption_prompts"}
    saved["evals"] = {
        name: {k: v for k, v in fields.items() if k not in ("num_beams", "length_penalty")}
        for name, fields in current["evals"].items()
    }
    upgraded = evaluate.upgrade_saved_config(saved)
    assert upgraded["loss"] == current["loss"]
    assert tuple(upgraded["data"]["caption_prompts"]) == tuple(current["data"]["caption_prompts"])
    assert upgraded["evals"] == current["evals"]


def test_a_blip2_stage1_saved_before_the_bridge_tokenizer_and_rerank_still_loads():
    from jaxvlm import evaluate

    current = config_utils.load_config(f"{CONFIGS}/blip2.py:stage=1,size=tiny").to_dict()
    saved = {**current, "bridge": {k: v for k, v in current["bridge"].items() if k != "tokenizer"}}
    saved["data"] = {
        k: v
        for k, v in current["data"].items()
        if k not in ("image_position", "bridge_max_text_len", "prefix_split", "decoder_max_len")
    }
    saved["evals"] = {"retrieval": {**current["evals"]["retrieval"]}}
    del saved["evals"]["retrieval"]["rerank"], saved["evals"]["retrieval"]["rerank_k"]
    upgraded = evaluate.upgrade_saved_config(saved)
    assert upgraded["bridge"] == current["bridge"]
    assert upgraded["data"] == current["data"]
    # Runs saved before re-ranking existed ranked by ITC alone.
    assert upgraded["evals"]["retrieval"]["rerank"] == "none"

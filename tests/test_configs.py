"""Every config builds; typos are errors that name the key; nothing is written before validation."""

import jax
import pytest
from helpers import CONFIGS

from jaxvlm import config_utils, models
from jaxvlm.importers import gguf as gguf_importer

RECIPES = [
    ("backbones_pretrain", "model=vit"),
    ("backbones_pretrain", "model=lm"),
    ("llava", "stage=1"),
    ("llava", "stage=2"),
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
    ],
)
def test_bad_steps_and_evaluators_are_config_errors(override, match):
    with pytest.raises(config_utils.ConfigError, match=match):
        config_utils.load_config(f"{CONFIGS}/backbones_pretrain.py:model=lm,size=tiny", override)


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

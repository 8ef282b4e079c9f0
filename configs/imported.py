"""The config of an imported model: what `python -m jaxvlm.convert` (and `--checkpoint PATH`) builds.

    python -m jaxvlm.convert --from-gguf SmolLM2-135M-Instruct.Q4_1.gguf --to runs/smollm2
    python -m jaxvlm.convert --from-hf ~/models/Qwen2-0.5B-Instruct --to runs/qwen2

`llm=llama|opt` picks the LLM module, `model=vlm` a finished LLaVA (ViT + MLP projector + Llama/Qwen2,
`LlavaForConditionalGeneration`); `convert` fills the rest from the checkpoint: `config.llm.checkpoint`
(the source), the architecture (its config.json or GGUF metadata, through the importer), the context
(`data.max_text_len` from its position limit) and the chat template shipped with its tokenizer (none:
plain text); for LLaVA also the tower's feature layer, the projector, the `<image>` id and the image
preprocessing of its processor files. Nothing trains: the workdir holds one full-state checkpoint at step 0, used as
`--workdir`, as `config.init_from` or as a component's `checkpoint`. Fine-tuning starts from a recipe
config with `config.init_from` pointing at it.
"""

from jaxvlm import config_utils

common = config_utils.load_sibling(__file__, "common")
backbones = config_utils.load_sibling(__file__, "backbones")

# A preset per LLM module: its non-architecture fields (dtype, layer scan, ...) are kept, its
# architecture fields are overwritten from the checkpoint (logged when they differ).
LLM_PRESETS = {"llama": backbones.llama("smollm2_135m"), "opt": backbones.opt("opt_125m")}


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, llm="llama", model="lm")
    if arg.llm not in LLM_PRESETS:
        raise config_utils.ConfigError(
            f"config argument llm={arg.llm!r}; allowed: {', '.join(sorted(LLM_PRESETS))}"
        )
    if arg.model not in ("lm", "vlm"):
        raise config_utils.ConfigError(f"config argument model={arg.model!r}; allowed: lm, vlm")
    config = common.base_config()
    config.model = arg.model
    config.objective = "lm"
    # The architecture fields come from the checkpoint (importers.resolve_architectures).
    config.llm = dict(name=arg.llm, checkpoint="", **LLM_PRESETS[arg.llm])
    if arg.model == "vlm":  # LLaVA-1.5's shapes until the checkpoint's replace them
        config.encoder = dict(name="vit", checkpoint="", **backbones.vit("clip_l14_336"))
        config.bridge = dict(
            name="mlp_projector", checkpoint="", projector="mlp2x_gelu", drop_class_token=True
        )
        config.preprocessing = common.preprocessing(336)
    # An instruction-tuned LLM answers chat turns: what the world's "instructions" data would
    # fine-tune it on; with no chat template, generation reads the prompt as plain text.
    config.data.task = "instructions"
    config.data.tokenizer = "llm"
    config.data.max_text_len = 2048  # the checkpoint's position limit, when it states one
    config.template = common.chat_template(system_message="")
    config.template.template = "from_tokenizer"
    config.template.roles = dict(user="user", assistant="assistant")
    config.template.separator = ""
    config.template.stop = ""  # the tokenizer's EOS ends a turn (ChatML's <|im_end|>, ...)
    # Trained as a whole (LLaVA: projector + LLM, its stage 2) when this config is fine-tuned; `convert` saves the imported weights
    # with config.trainable = () (no optimizer state: nothing has trained yet).
    config.trainable = ("llm/.*",) if arg.model == "lm" else ("bridge/.*", "llm/.*")
    config.train.save_full_state = True  # the workdir stands alone: every parameter is saved
    config.train.num_steps = 1
    config.optimizer.warmup_steps = 0
    # `python -m jaxvlm.evaluate` on the synthetic world (override num_examples for a quick look).
    if arg.model == "lm":
        config.evals.perplexity = dict(
            type="perplexity", split="validation", every_steps=0, batch_size=16
        )
    else:
        config.evals.vqa = common.vqa_eval(num_examples=300, batch_size=16)
        config.evals.caption = common.caption_eval(num_examples=100, batch_size=16)
    return config

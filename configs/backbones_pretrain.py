"""Self-pretrained backbones of the synthetic world: the CLIP-style ViT and the world LM.

    python -m jaxvlm.train --config=configs/backbones_pretrain.py:model=vit --workdir=runs/world_vit
    python -m jaxvlm.train --config=configs/backbones_pretrain.py:model=lm --workdir=runs/world_lm
    python -m jaxvlm.train --config=configs/backbones_pretrain.py:model=t5 --workdir=runs/world_t5

`model=vit` trains a dual encoder (ViT + small text tower, symmetric InfoNCE on captions) and reports
zero-shot retrieval R@1/5/10 on `test`; `model=lm` trains the Llama LM on the world's text only (captions,
QA, instructions: it never sees an image) and reports perplexity; `model=t5` trains a FlanT5-shaped
encoder-decoder on the same text with BLIP-2's prefix-LM split (the first s ~ U[1, n // 2] target
tokens to the encoder, the rest the decoder's target) and reports the perplexity of each held-out
text's second half given its first. All train only on training splits, so no held-out composition is
ever seen. Later recipes freeze these and reuse them from the cache (the T5 only when a BLIP-2
encoder-decoder job names it). `size=paper` gives the shapes of CLIP ViT-L/14-336, Vicuna-7B and
FlanT5-XL (built with jax.eval_shape, never run).
"""

from jaxvlm import config_utils

common = config_utils.load_sibling(__file__, "common")
backbones = config_utils.load_sibling(__file__, "backbones")


MODELS = ("vit", "lm", "t5")


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, model="vit", size="default")
    if arg.model not in MODELS:
        raise config_utils.ConfigError(
            f"config argument model={arg.model!r}; allowed: {', '.join(MODELS)}"
        )
    config = common.base_config()
    config.data.world = common.world(arg.size)
    config.trainable = (".*",)

    if arg.model == "vit":
        preset = {"tiny": "world_tiny", "default": "world_default", "paper": "clip_l14_336"}
        text = {
            "tiny": "world_text_tiny",
            "default": "world_text_default",
            "paper": "clip_text_l14",
        }
        config.model = "dual_encoder"
        config.objective = "contrastive"
        config.encoder = dict(name="vit", checkpoint="", **backbones.vit(preset[arg.size]))
        config.text_encoder = dict(name="llama", checkpoint="", **backbones.llama(text[arg.size]))
        config.contrastive.projection_dim = {"tiny": 32, "default": 128, "paper": 768}[arg.size]
        config.data.task = "captions"
        # 64 rather than 128 on CPU: per-sample cost is ~25% lower at this size (measured).
        config.data.batch_size = {"tiny": 16, "default": 64, "paper": 32768}[arg.size]
        config.data.max_text_len = {"tiny": 24, "default": 32, "paper": 77}[arg.size]
        config.optimizer.learning_rate = 1e-3
        config.optimizer.weight_decay = 0.1  # CLIP
        config.optimizer.b2 = 0.98  # CLIP
        config.optimizer.eps = 1e-6
        # 350 steps at batch 64: R@1 still rising, but the quickstart's 10-minute budget is shared.
        config.train.num_steps = {"tiny": 4, "default": 350, "paper": 100000}[arg.size]
        config.evals.retrieval = common.retrieval_eval()
    else:
        if arg.model == "lm":
            preset = {"tiny": "world_tiny", "default": "world_default", "paper": "vicuna_7b"}
            config.model = "lm"
            config.objective = "lm"
            config.llm = dict(name="llama", checkpoint="", **backbones.llama(preset[arg.size]))
        else:
            preset = {"tiny": "world_tiny", "default": "world_default", "paper": "flan_t5_xl"}
            config.model = "seq2seq_lm"
            config.objective = "prefix_lm"
            config.llm = dict(name="t5", checkpoint="", **backbones.t5(preset[arg.size]))
            config.data.prefix_split = "random"
        config.data.task = "text"
        config.data.split = ("train", "clips_train")  # clip texts carry the motion words
        # Rows of up to 10 texts about one scene (its captions, questions and instruction turns in
        # a random order): the LM learns the positions that LLaVA's prompts reach (image tokens
        # and template included), and, as a real LLM does from coherent documents, to answer from
        # what its context said about the scene, which the image tokens later say.
        config.data.batch_size = {"tiny": 16, "default": 8, "paper": 1024}[arg.size]
        config.data.max_text_len = {"tiny": 96, "default": 192, "paper": 2048}[arg.size]
        config.data.texts_per_row = {"tiny": 5, "default": 10, "paper": 1}[arg.size]
        config.data.text_packing = "record"
        # The decoder's part of a row is at least half of it.
        config.data.decoder_max_len = config.data.max_text_len
        config.optimizer.learning_rate = 3e-3 if arg.size != "paper" else 3e-4
        config.optimizer.b2 = 0.95
        config.optimizer.weight_decay = 0.1
        config.train.num_steps = {"tiny": 4, "default": 450, "paper": 100000}[arg.size]
        config.evals.perplexity = dict(
            type="perplexity", split="validation", every_steps=0, batch_size=128
        )

    if arg.size == "paper":
        config.preprocessing = common.preprocessing(336)
        config.optimizer.warmup_steps = 2000
    else:
        config.optimizer.warmup_steps = min(100, config.train.num_steps // 10)
    config.train.checkpoint_every = max(1, config.train.num_steps // 2)  # resumable mid-way
    config.train.log_every = max(1, min(50, config.train.num_steps // 10))
    return config

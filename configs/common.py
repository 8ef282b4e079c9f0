"""base_config(): every knob with its default, in one place. Recipes set only what differs.

Library code reads `config.x` and never `config.get("x", default)`: a default lives here once.
"""

from ml_collections import ConfigDict


def world(size: str = "default") -> ConfigDict:
    """The synthetic world the no-download default trains on (jaxvlm.data.world.WorldConfig fields)."""
    scenes = {"tiny": 256, "default": 20000, "paper": 20000}[size]
    eval_scenes = {"tiny": 64, "default": 1000, "paper": 1000}[size]
    clips = {"tiny": 16, "default": 2000, "paper": 2000}[size]
    return ConfigDict(
        dict(
            seed=0,
            num_scenes=scenes,
            num_eval_scenes=eval_scenes,
            image_size=64,
            max_objects=4,
            held_out=("purple star", "orange heart"),  # (colour, shape) seen only in test_novel
            num_clips=clips,
            num_eval_clips=max(1, clips // 10),
            clip_frames=8,
            clip_max_objects=2,
            num_shots=4,
        )
    )


def preprocessing(image_size: int = 64) -> ConfigDict:
    """Image preprocessing that travels with the model (`preprocessing.json`)."""
    return ConfigDict(
        dict(
            image_size=image_size,
            resize="shortest_edge",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        )
    )


# LLaVA §3: Vicuna v0's conversation format, `###` after every turn and as the stop string.
VICUNA_V0 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% endif %}"
    "{{ bos_token }}{{ system_message }}{{ separator }}"
    "{% for message in messages %}"
    "{{ roles[message['role']] }}: {{ message['content'] }}{{ separator }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ roles['assistant'] }}:{% endif %}"
)
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)
# LLaVA-1.5's short-answer VQA prompt, less "single" (not a word of the world's vocabulary).
VQA_PROMPT = "{question}\nAnswer the question using a word or phrase."
CAPTION_PROMPT = "Describe the image concisely."  # the first of LLaVA's brief-description prompts


def chat_template(system_message: str = VICUNA_SYSTEM) -> ConfigDict:
    """A jinja chat template and its variables (jaxvlm.data.chat.ChatTemplate fields)."""
    return ConfigDict(
        dict(
            template=VICUNA_V0,
            system_message=system_message,
            roles=dict(user="Human", assistant="Assistant"),
            separator="###",
            stop="###",
            image_placeholder="<image>",
        )
    )


def vqa_eval(split="test", num_examples=0, batch_size=64, max_new_tokens=10) -> ConfigDict:
    """VQAv2 accuracy of greedy answers to VQA_PROMPT (and the blind baseline beside it)."""
    return ConfigDict(
        dict(
            type="vqa",
            split=split,
            every_steps=0,
            batch_size=batch_size,
            num_examples=num_examples,  # a fixed subset of the split's questions; 0 = all
            prompt=VQA_PROMPT,
            max_new_tokens=max_new_tokens,
        )
    )


def caption_eval(split="test", num_examples=0, batch_size=64, max_new_tokens=24) -> ConfigDict:
    """CIDEr-D of greedy captions to CAPTION_PROMPT against every reference caption."""
    return ConfigDict(
        dict(
            type="captioning",
            split=split,
            every_steps=0,
            batch_size=batch_size,
            num_examples=num_examples,  # a fixed subset of the split's images; 0 = all
            prompt=CAPTION_PROMPT,
            max_new_tokens=max_new_tokens,
        )
    )


def base_config() -> ConfigDict:
    config = ConfigDict()
    config.model = "lm"  # a name in jaxvlm.models.MODELS
    config.objective = "lm"  # a name in jaxvlm.objectives.OBJECTIVES
    # Components: `name` selects the module in ENCODERS / LLMS / BRIDGES ("none" = absent); the other
    # keys are that module's fields. `checkpoint` names a pretrained source (a jaxvlm workdir for now).
    config.encoder = ConfigDict(dict(name="none", checkpoint=""))
    config.text_encoder = ConfigDict(dict(name="none", checkpoint=""))
    config.llm = ConfigDict(dict(name="none", checkpoint=""))
    config.bridge = ConfigDict(dict(name="none", checkpoint=""))
    # CLIP-style heads of the dual encoder (model="dual_encoder").
    config.contrastive = ConfigDict(
        dict(projection_dim=128, temperature_init=0.07, learn_temperature=True, label_smoothing=0.0)
    )
    # Regexes over parameter paths ("encoder/layers/..."): matching leaves train, the rest are frozen.
    config.trainable = (".*",)
    # A jaxvlm workdir or checkpoint whose matching parameters are loaded before the rest are initialised.
    config.init_from = ""

    config.data = ConfigDict(
        dict(
            world=world(),
            task="captions",  # "captions" (image-text pairs) or "text" (text only)
            # "world" (the synthetic world's word-level tokenizer), "llm" (the one shipped with
            # config.llm.checkpoint: an HF directory, a .gguf file or a jaxvlm workdir), or a path.
            tokenizer="world",
            split=("train",),  # one scene split for "captions"; several for "text"
            batch_size=64,  # global batch, all processes together
            max_text_len=32,
            texts_per_row=1,  # "text" task: texts concatenated into one row of max_text_len
            # "text" task: a row's texts are consecutive texts of the shuffled corpus ("stream")
            # or texts of one record in random order ("record": a document about one scene).
            text_packing="stream",
            worker_count=0,  # grain worker processes per host
            image_token_id=4,  # the <image> placeholder id (the world tokenizer's <image>)
            # Weights of the "instructions" task's sample types (jaxvlm.data.conversations).
            instruction_mix=dict(
                conversation=1.0, detail=1.0, complex_reasoning=1.0, vqa=0.0, caption=0.0
            ),
            vqa_prompt=VQA_PROMPT,  # the short-answer format of "vqa" samples
            vqa_turns=1,  # questions about one image asked in one "vqa" conversation
        )
    )
    # The conversation template of prefix VLMs (jaxvlm.data.chat.ChatTemplate). template=
    # "from_tokenizer" takes the jinja text shipped with config.data.tokenizer (a real chat LLM's).
    config.template = chat_template()
    config.preprocessing = preprocessing()

    config.optimizer = ConfigDict(
        dict(
            learning_rate=1e-3,
            min_learning_rate=0.0,  # floor of the cosine / linear decay
            warmup_steps=100,
            schedule="cosine",  # cosine | linear | constant (after linear warm-up)
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.05,  # decoupled (AdamW); applied to matrices, not to norms and biases
            grad_clip_norm=1.0,  # global-norm clip; 0 disables
        )
    )
    config.train = ConfigDict(
        dict(
            num_steps=1000,
            grad_accum_steps=1,  # micro-batches per step; must divide data.batch_size
            seed=0,
            log_every=50,
            checkpoint_every=500,
            keep_checkpoints=3,
            async_checkpoint=True,
            save_full_state=False,  # False: trainable params + optimizer state + a frozen manifest
            progress_bar=True,
        )
    )
    # Mesh shape over (data, fsdp, tensor); -1 takes the remaining devices.
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # {name: dict(type=<EVALUATORS key>, split=..., every_steps=..., ...)}; run during and after training.
    config.evals = ConfigDict()
    return config

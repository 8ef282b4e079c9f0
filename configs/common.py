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


# BLIP-2 §3.3: the soft visual prompt, then the text (the prompt, if any, then the answer or the
# caption); no roles. The answer ends with the LLM's EOS, its stop string.
BLIP2_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
BLIP2_VQA_PROMPT = "Question: {question} Answer:"  # BLIP-2's zero-shot VQA prompt for OPT
BLIP2_T5_VQA_PROMPT = "Question: {question} Short answer:"  # ... and for FlanT5
BLIP2_CAPTION_PROMPT = "a photo of"  # BLIP-2's captioning fine-tune prompt


def blip2_template(eos: str = "<eos>") -> ConfigDict:
    """BLIP2_TEMPLATE with `eos` (the LLM's EOS text) as the stop string."""
    return ConfigDict(
        dict(
            template=BLIP2_TEMPLATE,
            system_message="",
            roles=dict(user="user", assistant="assistant"),
            separator="",
            stop=eos,
            image_placeholder="<image>",
        )
    )


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


def generative_eval(
    type: str,
    *,
    prompt: str,
    max_new_tokens: int,
    split="test",
    num_examples=0,
    batch_size=64,
    num_beams=1,
    length_penalty=1.0,
) -> ConfigDict:
    """A generative evaluator (`vqa` or `captioning`) of answers to `prompt`, the blind baseline
    beside it; greedy unless `num_beams` > 1 (then beam search with `length_penalty`)."""
    return ConfigDict(
        dict(
            type=type,
            split=split,
            every_steps=0,
            batch_size=batch_size,
            num_examples=num_examples,  # a fixed subset of the split's examples; 0 = all
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
        )
    )


def vqa_eval(prompt=VQA_PROMPT, max_new_tokens=10, **fields) -> ConfigDict:
    """VQAv2 accuracy of the answers to `prompt` ("{question}" slot)."""
    return generative_eval("vqa", prompt=prompt, max_new_tokens=max_new_tokens, **fields)


def caption_eval(prompt=CAPTION_PROMPT, max_new_tokens=24, **fields) -> ConfigDict:
    """CIDEr-D of the captions written after `prompt`, against every reference caption."""
    return generative_eval("captioning", prompt=prompt, max_new_tokens=max_new_tokens, **fields)


def retrieval_eval(split="test", batch_size=256, rerank="none", rerank_k=128) -> ConfigDict:
    """Image-text R@1/5/10 both ways: by the model's contrastive similarity, or with `rerank`
    ("itm": BLIP-2's ITM head re-scores each query's `rerank_k` best ITC candidates; "itm_itc":
    ITM + ITC, as LAVIS ranks)."""
    return ConfigDict(
        dict(
            type="retrieval",
            split=split,
            every_steps=0,
            batch_size=batch_size,
            rerank=rerank,
            rerank_k=rerank_k,
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
    # Loss weights and label smoothings of a bridge's own stage (objective "bridge_pretrain";
    # BLIP-2 stage 1 sums ITC, ITM and ITG with equal weights and smooths ITC and ITG by 0.1).
    config.loss = ConfigDict(
        dict(itc=1.0, itm=1.0, itg=1.0, itc_label_smoothing=0.1, itg_label_smoothing=0.1)
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
            # "llava_captions" task: the instruction a caption answers, one drawn per example;
            # () is LLaVA's brief-description list (jaxvlm.data.instructions.BRIEF_PROMPTS);
            # BLIP-2 stage 2 uses ("",): the image tokens, then the caption.
            caption_prompts=(),
            # Where a training sample's image goes in its first user turn: "random" (before or
            # after the text, LLaVA §3) or "first" (BLIP-2's soft visual prompt).
            image_position="random",
            # "captions" task image augmentation: "none", or "blip2" (random resized crop keeping
            # >= 90% of the area and every object whole, then a flip that swaps left/right words).
            augment="none",
            # Tq of the prompt a prompt-reading bridge gets (config.bridge.read_prompt: BLIP-2's
            # VQA fine-tune feeds the question to the Q-Former; text max length 32 as §3.1).
            bridge_max_text_len=32,
            # Encoder-decoder LLMs (config.llm.name="t5"): how a sequence's target splits
            # between the encoder and the decoder (jaxvlm.data.transforms.SplitForEncoderDecoder):
            # "none" (every target token to the decoder), "random" (BLIP-2's prefix LM: the
            # first s ~ U[1, n // 2] of the n target tokens to the encoder) or "half" (s = n // 2,
            # deterministic: perplexity). The decoder's length is decoder_max_len.
            prefix_split="none",
            decoder_max_len=32,
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

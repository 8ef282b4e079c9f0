"""Named encoder and LLM presets: plain dicts of module fields, used as `dict(name=..., **preset)`.

World presets are what the no-download default pretrains; the others are the shapes of real checkpoints
(for `size=paper` and for importers).
"""

WORLD_VOCAB_SIZE = 1024  # the world tokenizer's word-level vocabulary fits (checked at train time)

VIT_PRESETS = {
    "world_tiny": dict(image_size=64, patch_size=16, width=32, depth=1, num_heads=2, mlp_dim=64),
    "world_default": dict(
        image_size=64, patch_size=8, width=128, depth=3, num_heads=4, mlp_dim=384
    ),
    # CLIP ViT-L/14 at 336 px, as LLaVA-1.5 uses it.
    "clip_l14_336": dict(
        image_size=336,
        patch_size=14,
        width=1024,
        depth=24,
        num_heads=16,
        mlp_dim=4096,
        activation="quick_gelu",
        norm_eps=1e-5,
    ),
    # CLIP ViT-L/14 at 224 px (LLaVA, BLIP-2 ViT-L).
    "clip_l14": dict(
        image_size=224,
        patch_size=14,
        width=1024,
        depth=24,
        num_heads=16,
        mlp_dim=4096,
        activation="quick_gelu",
        norm_eps=1e-5,
    ),
}

# Defaults shared by every ViT preset (CLIP-style: class token, pre-LayerNorm).
VIT_DEFAULTS = dict(
    activation="gelu",
    class_token=True,
    pre_norm=True,
    post_norm=True,
    pool="cls",
    norm_eps=1e-5,
    feature_layer=-1,
    scan_layers=True,
    remat="none",
    dtype="float32",  # computation
    param_dtype="float32",  # storage; frozen towers may be stored in bfloat16
)

LLAMA_PRESETS = {
    "world_tiny": dict(
        vocab_size=WORLD_VOCAB_SIZE,
        dim=32,
        depth=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        mlp_dim=64,
    ),
    "world_default": dict(
        vocab_size=WORLD_VOCAB_SIZE,
        dim=128,
        depth=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=384,
    ),
    # Text towers of the CLIP-style dual encoder.
    "world_text_tiny": dict(
        vocab_size=WORLD_VOCAB_SIZE,
        dim=32,
        depth=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=64,
    ),
    "world_text_default": dict(
        vocab_size=WORLD_VOCAB_SIZE,
        dim=96,
        depth=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=24,
        mlp_dim=256,
    ),
    "clip_text_l14": dict(
        vocab_size=49408,
        dim=768,
        depth=12,
        num_heads=12,
        num_kv_heads=12,
        head_dim=64,
        mlp_dim=3072,
    ),
    "smollm2_135m": dict(
        vocab_size=49152,
        dim=576,
        depth=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        mlp_dim=1536,
        tie_embeddings=True,
        rope_theta=100000.0,
    ),
    "vicuna_7b": dict(
        vocab_size=32000,
        dim=4096,
        depth=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        mlp_dim=11008,
        tie_embeddings=False,
        rms_norm_eps=1e-6,
    ),
}

LLAMA_DEFAULTS = dict(
    hidden_act="silu",
    tie_embeddings=True,
    attention_bias=False,
    qkv_bias=False,
    mlp_bias=False,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    num_added_embeddings=0,
    scan_layers=True,
    remat="none",
    dtype="float32",
    param_dtype="float32",
)


# The world's own backbones run on 2-core CPUs, where XLA:CPU runs an unrolled layer stack 15–25%
# faster than a scanned one at these sizes (measured); real-size presets keep the scan.
UNSCANNED_ON_CPU = dict(scan_layers=False)


def vit(preset: str) -> dict:
    if preset not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; known: {', '.join(sorted(VIT_PRESETS))}")
    cpu = UNSCANNED_ON_CPU if preset.startswith("world_") else {}
    return {**VIT_DEFAULTS, **VIT_PRESETS[preset], **cpu}


def llama(preset: str) -> dict:
    if preset not in LLAMA_PRESETS:
        raise ValueError(
            f"unknown Llama preset {preset!r}; known: {', '.join(sorted(LLAMA_PRESETS))}"
        )
    cpu = UNSCANNED_ON_CPU if preset.startswith("world_") else {}
    return {**LLAMA_DEFAULTS, **LLAMA_PRESETS[preset], **cpu}


# OPT (Zhang et al., 2022) shapes, as their config.json files give them; `dim` is the width callers
# see (HF word_embed_proj_dim), `layer_dim` the blocks' width (HF hidden_size). An HF directory in
# `config.llm.checkpoint` overwrites these fields from its config.json (`resolve_architectures`).
OPT_PRESETS = {
    "opt_125m": dict(dim=768, layer_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    # The post-LN OPT: no final layer norm, 512-wide embeddings projected to 1024.
    "opt_350m": dict(
        dim=512,
        layer_dim=1024,
        depth=24,
        num_heads=16,
        mlp_dim=4096,
        pre_layer_norm=False,
        final_norm=False,
    ),
    # BLIP-2's decoder LLMs.
    "opt_2.7b": dict(dim=2560, layer_dim=2560, depth=32, num_heads=32, mlp_dim=10240),
    "opt_6.7b": dict(dim=4096, layer_dim=4096, depth=32, num_heads=32, mlp_dim=16384),
}

OPT_DEFAULTS = dict(
    vocab_size=50272,
    max_positions=2048,
    hidden_act="relu",
    pre_layer_norm=True,
    final_norm=True,
    use_bias=True,
    norm_affine=True,
    tie_embeddings=True,
    num_added_embeddings=0,
    scan_layers=True,
    remat="none",
    dtype="float32",
    param_dtype="float32",
)


def opt(preset: str) -> dict:
    if preset not in OPT_PRESETS:
        raise ValueError(f"unknown OPT preset {preset!r}; known: {', '.join(sorted(OPT_PRESETS))}")
    return {**OPT_DEFAULTS, **OPT_PRESETS[preset]}


# T5 / FlanT5 encoder-decoders (HF T5Config: dim = d_model, depth = num_layers, decoder_depth =
# num_decoder_layers, head_dim = d_kv, mlp_dim = d_ff). The world's is FlanT5-shaped (gated GeLU,
# untied head, no output scaling) and pretrained on the world's text with the prefix-LM split
# (`backbones_pretrain.py:model=t5`), for BLIP-2's encoder-decoder stage 2 only.
T5_PRESETS = {
    "world_tiny": dict(
        vocab_size=WORLD_VOCAB_SIZE,
        dim=32,
        depth=1,
        decoder_depth=1,
        num_heads=2,
        head_dim=16,
        mlp_dim=64,
    ),
    "world_default": dict(
        vocab_size=WORLD_VOCAB_SIZE,
        dim=128,
        depth=2,
        decoder_depth=2,
        num_heads=4,
        head_dim=32,
        mlp_dim=384,
    ),
    # BLIP-2's FlanT5-XL (google/flan-t5-xl config.json).
    "flan_t5_xl": dict(
        vocab_size=32128,
        dim=2048,
        depth=24,
        decoder_depth=24,
        num_heads=32,
        head_dim=64,
        mlp_dim=5120,
    ),
}

T5_DEFAULTS = dict(
    hidden_act="gelu_tanh",
    gated_mlp=True,
    tie_embeddings=False,
    scale_decoder_outputs=False,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    rms_norm_eps=1e-6,
    num_added_embeddings=0,
    scan_layers=True,
    remat="none",
    dtype="float32",
    param_dtype="float32",
)


def t5(preset: str) -> dict:
    if preset not in T5_PRESETS:
        raise ValueError(f"unknown T5 preset {preset!r}; known: {', '.join(sorted(T5_PRESETS))}")
    cpu = UNSCANNED_ON_CPU if preset.startswith("world_") else {}
    return {**T5_DEFAULTS, **T5_PRESETS[preset], **cpu}

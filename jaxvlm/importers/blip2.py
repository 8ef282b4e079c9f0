"""A finished Hugging Face BLIP-2 (`model_type` blip-2) → our `VLM`: ViT encoder + `qformer`
bridge, + an OPT LLM for generation.

BLIP-2 (Li et al., 2023; papers.md §1). config.json `architectures` picks the model:
- `Blip2ForConditionalGeneration` (and `Blip2Model`, the same tensors; the default when the field
  is absent): ViT → Q-Former (queries only) → `language_projection` → OPT, the projected queries
  at the `image_token_index` placeholders;
- `Blip2ForImageTextRetrieval` (stage 1): ViT → Q-Former with its text side, `vision_projection`,
  `text_projection`, `itm_head`; imported with `llm.name="none"`, so `VLM.retrieval_*_embeddings`
  give HF's ITC embeddings (`use_image_text_matching_head=False`: similarity = max over the
  queries of the cosines, **no temperature**: HF has none) and the bridge's `itm_logits` HF's ITM
  logits (`=True`).

Vision tower (HF `Blip2VisionModel`, BLIP's ViT): class token, patch bias, no pre-norm, pre-LN
blocks with a fused `qkv` [3D, D] (its bias split into q/k/v: HF's zero k bias is a stored tensor
too) and `projection`, then `post_layernorm` on every token of the last layer, the
`last_hidden_state` the Q-Former reads. Ours: the encoder's existing fields (`pre_norm=False`,
`patch_bias=True`, `pool="none"`, `post_norm=False`, `feature_layer=-1`, `feature_norm=False`),
with `post_layernorm` imported as the bridge's `ln_vision` (the same single LayerNorm before the
cross-attention; no encoder change was needed).

Q-Former (our layout follows HF `Blip2QFormerModel`): `query_tokens [1, Q, D]` → `query_tokens`;
`qformer.layernorm` (HF normalises `[queries; text embeddings]`, as our `embed_layer_norm` does) →
`embed_layer_norm`; per layer `attention` / `crossattention` → `self_attn` / `cross_attn`
(`attention.{query,key,value}`, `output.dense`, `output.LayerNorm`), `intermediate_query` +
`output_query` → `feed_forward_query`, `intermediate` + `output` → `feed_forward`;
retrieval's `embeddings.{word,position}_embeddings` → `word_embeddings`, `position_embeddings`.

Parameters no checkpoint holds are left to the caller's fresh initialisation (as LLaVA's added
rows are) and listed by `fresh_parameters`: always ITC's `temperature` and the ITG head
(`lm_head_*`, no HF class has one); for generation also the Q-Former's whole text side
(`word_embeddings`, `position_embeddings`, `vision_projection`, `text_projection`, `itm_head`, and
the text `feed_forward` unless `use_qformer_text_input` stored it).

Text: our ITC/ITM set the Q-Former text's first id to `cls_token_id`, HF reads the ids as given;
the same numbers when the text starts with `[CLS]`, as BERT's tokenizer writes it
(`cls_token_id`: the directory tokenizer's `[CLS]`, else BERT's 101). Retrieval inputs are the
Q-Former text without `Blip2Processor`'s image tokens. Generation prompts follow `Blip2Processor`:
`num_query_tokens` image tokens *before* the tokenised text (its BOS included):
`Blip2ProcessorSpec.encode`.

Refused with one line naming the field: an encoder-decoder `text_config` (FlanT5: `vlm.py`
composes decoder-only LLMs only), another LLM than OPT, `image_token_index` null (generation),
non-square image or patch sizes, `vision_config.qkv_bias` false, OPT's `word_embed_proj_dim` ≠
`hidden_size`, a non-absolute `position_embedding_type`, unknown activations or architectures.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxvlm.importers import bert, clip, llava, opt
from jaxvlm.importers.base import (
    CheckpointImportError,
    HFCheckpoint,
    check_filled,
    linear_kernel,
    read_config,
    unsupported,
)
from jaxvlm.llms.stack import merge_layers

__all__ = [
    "MODEL_TYPES",
    "Blip2ProcessorSpec",
    "fresh_parameters",
    "load_params",
    "processor",
    "prompt_template",
    "update_config",
    "vlm_config",
]

logger = logging.getLogger(__name__)

MODEL_TYPES = ("blip-2",)
# config.json `architectures[0]` → what is imported ("generation" needs an LLM).
ARCHITECTURES = {
    "Blip2ForConditionalGeneration": "generation",
    "Blip2Model": "generation",
    "Blip2ForImageTextRetrieval": "retrieval",
}
ENCODER_DECODER_TYPES = ("t5", "mt5", "umt5", "bart", "mbart")
COMPONENTS = ("encoder", "bridge", "llm")
# Fields of a component block that are the user's and survive a change of module (update_config).
USER_FIELDS = ("checkpoint", "dtype", "param_dtype", "scan_layers", "remat", "implementation")
_REQUIRED = {
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size"),
    "qformer_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
    "text_config": ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim"),
}
BERT_CLS_ID = 101
# Bridge parameters no HF BLIP-2 holds, and those only the retrieval model holds.
NEVER_STORED = ("temperature", "lm_head_transform", "lm_head_layer_norm", "lm_head_bias")
TEXT_SIDE = ("word_embeddings", "position_embeddings", "vision_projection", "text_projection")
TEXT_SIDE += ("itm_head",)
TEXT_FEED_FORWARD = re.compile(r"bridge/layers_\d+/feed_forward/")
# Our attention block under `layers_{i}` → HF's module under `qformer.encoder.layer.{i}.`.
QFORMER_ATTENTION = {"self_attn": "attention", "cross_attn": "crossattention"}
QFORMER_FEED_FORWARD = {
    "feed_forward_query": ("intermediate_query", "output_query"),
    "feed_forward": ("intermediate", "output"),
}
TEXT_FFN_MARKER = "qformer.encoder.layer.0.intermediate.dense.weight"
RETRIEVAL_HEADS = ("vision_projection", "text_projection", "itm_head")


def _blip2_config(directory: str | Path) -> dict:
    """config.json, sub-configs completed with transformers' defaults when a field is missing."""
    hf = read_config(directory)
    if hf.get("model_type") not in MODEL_TYPES:
        raise unsupported("blip-2", "model_type", hf.get("model_type"), "supported: blip-2")
    text_type = (hf.get("text_config") or {}).get("model_type", "opt")
    if text_type in ENCODER_DECODER_TYPES:
        raise CheckpointImportError(
            f"text_config.model_type={text_type!r}: encoder-decoder BLIP-2 needs jaxvlm/vlm.py "
            "to feed the queries and prompt to the LLM's encoder and decode with its decoder, "
            f"but it composes decoder-only LLMs only (supported: opt) ({directory}/config.json)"
        )
    if text_type != "opt":
        raise unsupported("blip-2", "text_config.model_type", text_type, "supported: opt")
    sparse = any(
        not isinstance(hf.get(name), Mapping) or any(k not in hf[name] for k in required)
        for name, required in _REQUIRED.items()
    )
    if sparse:
        import transformers

        try:
            full = transformers.Blip2Config.from_dict(hf).to_dict()
        except (ValueError, KeyError, TypeError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointImportError(f"{directory}/config.json: {first}") from None
        hf = {**full, **{k: v for k, v in hf.items() if k not in _REQUIRED}}
    return hf


def _kind(hf: dict) -> str:
    names = hf.get("architectures") or ["Blip2ForConditionalGeneration"]
    if names[0] not in ARCHITECTURES:
        raise unsupported("blip-2", "architectures", names, f"supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[names[0]]


def _square(vision: dict, field: str) -> int:
    value = vision[field]
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise unsupported("blip-2", f"vision_config.{field}", value, "one int: square only")
    return value


def _encoder(vision: dict) -> dict:
    act = vision.get("hidden_act", "gelu")
    if act not in clip.HIDDEN_ACTS:
        raise unsupported(
            "blip-2", "vision_config.hidden_act", act, f"supported: {', '.join(clip.HIDDEN_ACTS)}"
        )
    if not vision.get("qkv_bias", True):
        raise unsupported(
            "blip-2", "vision_config.qkv_bias", False, "our ViT's q/k/v projections have biases"
        )
    return dict(
        name="vit",
        image_size=_square(vision, "image_size"),
        patch_size=_square(vision, "patch_size"),
        width=int(vision["hidden_size"]),
        depth=int(vision["num_hidden_layers"]),
        num_heads=int(vision["num_attention_heads"]),
        mlp_dim=int(vision["intermediate_size"]),
        activation=clip.HIDDEN_ACTS[act],
        class_token=True,
        pre_norm=False,
        post_norm=False,  # post_layernorm is the bridge's ln_vision
        patch_bias=True,
        pool="none",
        norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        feature_layer=-1,  # HF's last_hidden_state: the last layer
        feature_norm=False,
    )


def _bridge(hf: dict, cls_token_id: int) -> dict:
    q = hf["qformer_config"]
    act = q.get("hidden_act", "gelu")
    if act not in bert.HIDDEN_ACTS:
        raise unsupported(
            "blip-2", "qformer_config.hidden_act", act, f"supported: {', '.join(bert.HIDDEN_ACTS)}"
        )
    position_type = q.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise unsupported(
            "blip-2", "qformer_config.position_embedding_type", position_type, "absolute only"
        )
    dim, heads = int(q["hidden_size"]), int(q["num_attention_heads"])
    if dim % heads:
        raise unsupported(
            "blip-2", "qformer_config.num_attention_heads", heads, f"must divide {dim}"
        )
    vocab_size = int(q["vocab_size"])
    return dict(
        name="qformer",
        num_queries=int(hf.get("num_query_tokens", 32)),
        dim=dim,
        depth=int(q["num_hidden_layers"]),
        num_heads=heads,
        mlp_dim=int(q["intermediate_size"]),
        cross_attention_frequency=int(q.get("cross_attention_frequency", 2)),
        vocab_size=vocab_size,
        max_positions=int(q.get("max_position_embeddings", 512)),
        embed_dim=int(hf.get("image_text_hidden_size", 256)),
        hidden_act=bert.HIDDEN_ACTS[act],
        layer_norm_eps=float(q.get("layer_norm_eps", 1e-12)),
        vision_norm_eps=float(hf["vision_config"].get("layer_norm_eps", 1e-6)),
        read_prompt=False,
        cls_token_id=cls_token_id,
        dec_token_id=vocab_size - 1,  # LAVIS appends [DEC] last; ITG is not in HF
    )


def _cls_token_id(directory: Path, vocab_size: int) -> int:
    """The tokenizer's `[CLS]` id; without one BERT's 101 (0 in a vocabulary that small)."""
    path = Path(directory).expanduser() / "tokenizer.json"
    if path.is_file():
        import tokenizers

        found = tokenizers.Tokenizer.from_file(str(path)).token_to_id("[CLS]")
        if found is not None:
            return int(found)
    return BERT_CLS_ID if BERT_CLS_ID < vocab_size else 0


def _components(directory: str | Path, hf: dict) -> dict[str, dict]:
    """The `encoder`, `bridge`, `llm` (and for generation `data`) blocks of `vlm_config`."""
    kind = _kind(hf)
    vocab = int(hf["qformer_config"]["vocab_size"])
    blocks = {
        "encoder": _encoder(hf["vision_config"]),
        "bridge": _bridge(hf, _cls_token_id(Path(directory), vocab)),
        "llm": {"name": "none"},
    }
    if kind == "retrieval":
        return blocks
    text = hf["text_config"]
    llm = opt.architecture(text)
    if llm["dim"] != llm["layer_dim"]:
        raise unsupported(
            "blip-2",
            "text_config.word_embed_proj_dim",
            text.get("word_embed_proj_dim"),
            f"language_projection writes hidden_size={llm['layer_dim']}: they must be equal",
        )
    token_id = hf.get("image_token_index", hf.get("image_token_id"))
    if isinstance(token_id, bool) or not isinstance(token_id, int):
        raise unsupported(
            "blip-2",
            "image_token_index",
            token_id,
            "an id: transformers 5 BLIP-2 puts the queries at its image tokens (blip2-opt: 50265)",
        )
    if not 0 <= token_id < llm["vocab_size"]:
        raise unsupported(
            "blip-2", "image_token_index", token_id, f"below vocab_size={llm['vocab_size']}"
        )
    blocks["llm"] = {"name": "opt", **llm, "num_added_embeddings": 0}
    blocks["data"] = {"image_token_id": token_id}
    return blocks


def prompt_template(image_token: str) -> str:
    """A chat template that lays a prompt out as `Blip2Processor` does: the user turn's image
    placeholders (where `chat.place_images` put them, or the user wrote them) first, then BOS and
    the text; an assistant turn is its text and EOS."""
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        f"{{{{ '{image_token}' * message['content'].count('{image_token}') }}}}{{{{ bos_token }}}}"
        f"{{{{ message['content'].replace('{image_token}\\n', '').replace('{image_token}', '') }}}}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
        "{% endif %}{% endfor %}"
    )


def vlm_config(directory: str | Path) -> dict[str, dict]:
    """Config overrides `{block: {field: value}}` for a BLIP-2 directory: `encoder`, `bridge`,
    `llm` (`name="none"` for retrieval), `preprocessing`, and for generation `data`
    (`image_token_id`) and `template` (`prompt_template`, no stop string: EOS ends the answer).
    `update_config` applies them."""
    hf = _blip2_config(directory)
    spec = processor(directory)
    blocks = {**_components(directory, hf), "preprocessing": spec.preprocessing}
    if "data" in blocks:
        template = prompt_template(spec.image_token)
        blocks["template"] = {
            "template": template,
            "stop": "",
            "image_placeholder": spec.image_token,
        }
    return blocks


def update_config(config, overrides: Mapping[str, Mapping]) -> None:
    """Writes `vlm_config` overrides into `config` (locked or not), `config.model = "vlm"`.

    A component block whose `name` changes (a Llama preset becoming OPT, an MLP projector the
    Q-Former) is replaced by the new fields plus the old block's `USER_FIELDS` that the new module
    has; `llm.name="none"` also clears `llm.checkpoint` (the retrieval model has no LLM).
    """
    from jaxvlm.bridges import BRIDGES
    from jaxvlm.encoders import ENCODERS
    from jaxvlm.llms import LLMS

    tables = {
        "encoder": ENCODERS,
        "bridge": {name: module.Bridge for name, module in BRIDGES.items()},
        "llm": LLMS,
    }
    with config.unlocked():
        config.model = "vlm"
        for block, fields in overrides.items():
            old = config[block] if block in config else {}
            if block in tables and ("name" not in old or old["name"] != fields["name"]):
                if fields["name"] == "none":
                    config[block] = {"name": "none", "checkpoint": ""}
                    continue
                known = {f.name for f in dataclasses.fields(tables[block][fields["name"]])}
                keep = {
                    k: old[k] for k in USER_FIELDS if k in old and (k in known or k == "checkpoint")
                }
                config[block] = {**keep, **fields}
                continue
            for key, value in fields.items():
                config[block][key] = value


def fresh_parameters(directory: str | Path, expected: Mapping) -> list[str]:
    """The `expected` paths (`{path: shape-like}`) no tensor of `directory` fills, which the
    caller initialises fresh (see the module docstring)."""
    from jaxvlm.importers import FRESH_PARAMETERS  # local: importers/__init__ imports this module

    hf = _blip2_config(directory)
    retrieval = _kind(hf) == "retrieval"
    names = NEVER_STORED + (() if retrieval else TEXT_SIDE)
    text_ffn = retrieval or TEXT_FFN_MARKER in HFCheckpoint(directory)
    return sorted(
        k
        for k in expected
        if (k.startswith("bridge/") and k.split("/")[1] in names)
        or (not text_ffn and TEXT_FEED_FORWARD.match(k))
        or (k.split("/", 1)[0] in COMPONENTS and k.rsplit("/", 1)[-1] in FRESH_PARAMETERS)
    )


def load_params(directory: str | Path, config: Mapping, expected: Mapping) -> dict[str, np.ndarray]:
    """`{"encoder/...", "bridge/...", "llm/...": numpy array}`: every tensor of a BLIP-2 directory.

    Args:
      directory: the HF BLIP-2 directory (config.json + safetensors).
      config: a mapping with `encoder`, `bridge` and `llm` blocks whose architecture fields equal
        `vlm_config(directory)`'s (dtypes, scan_layers, remat stay the user's).
      expected: `{path: shape-like}` of the whole model's parameters.

    Raises:
      CheckpointImportError naming differing config fields, or listing the checkpoint tensors
      left unused and the parameters (other than `fresh_parameters`) left unfilled or mis-shaped.
    """
    from jaxvlm.param_paths import flatten_params

    hf = _blip2_config(directory)
    derived = _components(directory, hf)
    differing = sorted(
        f"{block}.{key}"
        for block in COMPONENTS
        for key, value in derived[block].items()
        if key not in config[block] or llava._plain(config[block][key]) != value
    )
    if differing:
        raise CheckpointImportError(
            f"{directory}: the config differs from its config.json in {differing} "
            "(take them from blip2.vlm_config)"
        )
    checkpoint = HFCheckpoint(directory)
    retrieval = _kind(hf) == "retrieval"
    trees = {
        "encoder": _convert_vision(checkpoint, derived["encoder"], config["encoder"]),
        "bridge": _convert_qformer(checkpoint, derived["bridge"], retrieval),
    }
    if not retrieval:
        llm_arch = {k: derived["llm"][k] for k in opt.ARCHITECTURE_FIELDS}
        view = llava._LanguageModelView(
            checkpoint, "language_model.model.", "language_model.lm_head.weight"
        )
        trees["llm"] = opt.convert(view, llm_arch, config["llm"])
    checkpoint.finish()
    loaded = {
        f"{block}/{path}": value
        for block, tree in trees.items()
        for path, value in flatten_params(tree).items()
    }
    fresh = set(fresh_parameters(directory, expected))
    if fresh:
        logger.info("%s: %d parameter arrays are not in the checkpoint", directory, len(fresh))
    wanted = {k: v for k, v in expected.items() if k.split("/", 1)[0] in COMPONENTS}
    check_filled(directory, loaded, {k: v for k, v in wanted.items() if k not in fresh})
    return loaded


def _convert_vision(checkpoint: HFCheckpoint, arch: dict, component_config: Mapping) -> dict:
    """HF `vision_model.*` → the ViT tree (numpy leaves), without `post_layernorm`."""
    take, p = checkpoint.take, "vision_model."
    width, heads = arch["width"], arch["num_heads"]
    head_dim = width // heads

    def norm(key):
        return {"scale": take(f"{key}.weight"), "bias": take(f"{key}.bias")}

    def dense(key):
        return {"kernel": take(f"{key}.weight").T, "bias": take(f"{key}.bias")}

    layers = []
    for i in range(arch["depth"]):
        q = f"{p}encoder.layers.{i}."
        qkv_weight, qkv_bias = take(f"{q}self_attn.qkv.weight"), take(f"{q}self_attn.qkv.bias")
        attention = {
            name: {
                "kernel": linear_kernel(
                    qkv_weight[j * width : (j + 1) * width], "heads_in", heads, head_dim
                ),
                "bias": qkv_bias[j * width : (j + 1) * width].reshape(heads, head_dim),
            }
            for j, name in enumerate(("q_proj", "k_proj", "v_proj"))
        }
        attention["o_proj"] = {
            "kernel": linear_kernel(
                take(f"{q}self_attn.projection.weight"), "heads_out", heads, head_dim
            ),
            "bias": take(f"{q}self_attn.projection.bias"),
        }
        layers.append(
            {
                "layer_norm1": norm(f"{q}layer_norm1"),
                "layer_norm2": norm(f"{q}layer_norm2"),
                "self_attn": attention,
                "mlp": {name: dense(f"{q}mlp.{name}") for name in ("fc1", "fc2")},
            }
        )
    other = {
        "patch_embedding": {
            "kernel": take(f"{p}embeddings.patch_embedding.weight").transpose(2, 3, 1, 0),
            "bias": take(f"{p}embeddings.patch_embedding.bias"),
        },
        "class_embedding": take(f"{p}embeddings.class_embedding").reshape(width),
        "position_embedding": take(f"{p}embeddings.position_embedding")[0],
    }
    scan = component_config["scan_layers"] if "scan_layers" in component_config else True
    return merge_layers(other, layers, scan_layers=scan)


def _convert_qformer(checkpoint: HFCheckpoint, arch: dict, retrieval: bool) -> dict:
    """HF `query_tokens`, `qformer.*`, `vision_model.post_layernorm` and the projections/heads →
    the bridge tree (numpy leaves); the text feed-forward when stored (always for retrieval)."""
    take = checkpoint.take
    heads = arch["num_heads"]
    head_dim = arch["dim"] // heads

    def norm(key):
        return {"scale": take(f"{key}.weight"), "bias": take(f"{key}.bias")}

    def dense(key, kind="dense"):
        bias = take(f"{key}.bias")
        return {
            "kernel": linear_kernel(take(f"{key}.weight"), kind, heads, head_dim),
            "bias": bias.reshape(heads, head_dim) if kind == "heads_in" else bias,
        }

    text_ffn = retrieval or TEXT_FFN_MARKER in checkpoint
    tree = {
        "query_tokens": take("query_tokens")[0],
        "embed_layer_norm": norm("qformer.layernorm"),
        "ln_vision": norm("vision_model.post_layernorm"),
    }
    for i in range(arch["depth"]):
        p = f"qformer.encoder.layer.{i}."
        layer = {}
        for ours, theirs in QFORMER_ATTENTION.items():
            if ours == "cross_attn" and i % arch["cross_attention_frequency"]:
                continue
            layer[ours] = {
                "attention": {
                    name: dense(f"{p}{theirs}.attention.{key}", "heads_in")
                    for name, key in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))
                }
                | {"o_proj": dense(f"{p}{theirs}.output.dense", "heads_out")},
                "layer_norm": norm(f"{p}{theirs}.output.LayerNorm"),
            }
        for ours, (fc1, fc2) in QFORMER_FEED_FORWARD.items():
            if ours == "feed_forward" and not text_ffn:
                continue
            layer[ours] = {
                "mlp": {"fc1": dense(f"{p}{fc1}.dense"), "fc2": dense(f"{p}{fc2}.dense")},
                "layer_norm": norm(f"{p}{fc2}.LayerNorm"),
            }
        tree[f"layers_{i}"] = layer
    if retrieval:
        for name in ("word_embeddings", "position_embeddings"):
            tree[name] = {"embedding": take(f"embeddings.{name}.weight")}
        tree.update({name: dense(name) for name in RETRIEVAL_HEADS})
    else:
        tree["language_projection"] = dense("language_projection")
    return tree


@dataclasses.dataclass(frozen=True)
class Blip2ProcessorSpec:
    """What `Blip2Processor` does to a prompt and its image.

    Attributes:
      preprocessing: `ImagePreprocessing` fields (BLIP: a square resize, no crop, CLIP's mean/std).
      image_token: the placeholder text ("<image>").
      num_image_tokens: Q, the image tokens (= the model's `num_query_tokens`).
    """

    preprocessing: dict
    image_token: str
    num_image_tokens: int

    def encode(self, tokenizer, text: str, image_token_id: int) -> list[int]:
        """`Blip2Processor`'s input_ids: Q image ids, then `tokenizer(text)` (BOS included)."""
        ids = tokenizer.encode(text, add_special_tokens=True)
        return [image_token_id] * self.num_image_tokens + list(ids)


def processor(directory: str | Path) -> Blip2ProcessorSpec:
    """The processor files' preprocessing (`processor_config.json`'s `image_processor`, or
    `preprocessor_config.json`), `<image>` text and image-token count; without files,
    `BlipImageProcessor`'s defaults at the vision tower's size."""
    from jaxvlm.data.preprocessing import CLIP_MEAN, CLIP_STD

    directory = Path(directory).expanduser()
    hf = _blip2_config(directory)
    size = _square(hf["vision_config"], "image_size")
    settings, image, source = {}, None, directory / "processor_config.json"
    if source.is_file():
        settings = llava._read_json(source)
        image = settings.get("image_processor")
    if image is None and (directory / "preprocessor_config.json").is_file():
        source = directory / "preprocessor_config.json"
        image = llava._read_json(source)
    defaults = dict(
        size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3
    )
    # BlipImageProcessor resizes to a square and never crops.
    image = {**defaults, **(image or {}), "do_center_crop": False}
    fields = llava._preprocessing(image, False, size, source)
    count = int(settings.get("num_query_tokens") or hf.get("num_query_tokens", 32))
    if count != int(hf.get("num_query_tokens", 32)):
        raise CheckpointImportError(
            f"{source}: num_query_tokens={count} but config.json has "
            f"num_query_tokens={hf.get('num_query_tokens', 32)}"
        )
    spec = Blip2ProcessorSpec(
        preprocessing=fields,
        image_token=str(settings.get("image_token", "<image>")),
        num_image_tokens=count,
    )
    if hf.get("image_token_index") is not None:
        llava._check_image_token(directory, spec.image_token, hf)
    return spec

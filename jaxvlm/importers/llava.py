"""A finished Hugging Face LLaVA (`model_type` llava, `LlavaForConditionalGeneration`) → our `VLM`:
ViT encoder + `mlp_projector` bridge + Llama/Qwen2 LLM, with its processor's preprocessing.

LLaVA (Liu et al., 2023; papers.md §3): the vision tower's `hidden_states[vision_feature_layer]`
(`"default"` strategy: without the first token, the CLS of a CLIP tower; `"full"`: all tokens)
→ `linear_1` → GELU → `linear_2` → one token per feature at the `<image>` placeholders.

For the lead (what `convert` / `--checkpoint DIR` calls):

- `vlm_config(directory) -> {block: {field: value}}`: overrides for `config.model`, `encoder`,
  `bridge`, `llm`, `data` (`image_token_id`) and `preprocessing`. The encoder and LLM fields come
  from `clip.architecture` / `llama.architecture` on `vision_config` / `text_config`;
  `vision_feature_layer` → `encoder.feature_layer`, the select strategy →
  `bridge.drop_class_token` (HF's "default" drops the first token even of a SigLIP tower, which has
  no CLS; so do we). `update_config(config, overrides)` writes them into a (locked) ConfigDict.
- `load_params(directory, config, expected) -> {path: np.ndarray}`: every tensor, flat under
  `encoder/`, `bridge/`, `llm/`, reusing the CLIP and Llama importers' tables, with strict
  accounting (unused checkpoint tensors and unfilled parameters are listed in one error).
- `processor(directory) -> LlavaProcessorSpec`: the preprocessing fields
  (`data.preprocessing.ImagePreprocessing`) from `processor_config.json` (transformers 5) or
  `preprocessor_config.json`, the `<image>` text and the image-token count per image computed as
  `LlavaProcessor` does, `(crop_h // patch) * (crop_w // patch) + num_additional_image_tokens`,
  minus 1 for the "default" strategy; its `expand(text)` repeats each `<image>` that many times, as
  the processor does before tokenising.

Checkpoint layouts: transformers 5.23's `save_pretrained` (like the llava-hf hub repositories)
writes `vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.weight` (verified); checkpoints saved under transformers' module names
(`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
`lm_head.weight`) are read too.

Refused with one line naming the field: a list `vision_feature_layer` (HF concatenates several
layers; our bridge reads one), `projector_hidden_act` other than "gelu" (exact erf GELU, our
`mlp2x_gelu`), `multimodal_projector_bias` false, an unknown select strategy, text or vision
models the Llama / CLIP importers refuse, and processor settings our `ImagePreprocessing` cannot
express. `image_seq_length` is not read (the count follows from the vision tower). Config fields
a sparse `config.json` omits (as the llava-hf hub configs do) take transformers' defaults.

Preprocessing parity: ours resizes with Pillow, like transformers' PIL image-processor backend
(`CLIPImageProcessorPil`, and the default `CLIPImageProcessor` when torchvision is absent); with
torchvision installed transformers 5 resizes with torchvision's antialiased filter, which can
differ by a grey level. Images already at the crop size are not resampled by either.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxvlm.importers import clip, llama
from jaxvlm.importers.base import (
    CheckpointImportError,
    HFCheckpoint,
    check_filled,
    read_config,
    unsupported,
)

__all__ = [
    "MODEL_TYPES",
    "LlavaProcessorSpec",
    "load_params",
    "processor",
    "update_config",
    "vlm_config",
]

MODEL_TYPES = ("llava",)
PROJECTOR_ACTS = {"gelu": "mlp2x_gelu"}  # HF ACT2FN["gelu"]: exact erf GELU
SELECT_STRATEGIES = ("default", "full")
COMPONENTS = ("encoder", "bridge", "llm")
# Sub-config fields the CLIP / Llama importers index directly; when one is missing, the whole
# config is completed with transformers' defaults (LlavaConfig), as transformers itself reads it.
_REQUIRED = {
    "vision_config": (
        "model_type",
        "image_size",
        "patch_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    ),
    "text_config": (
        "model_type",
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    ),
}
# (projector, language-model body, lm_head) key prefixes of the two checkpoint layouts.
_LAYOUTS = (
    ("multi_modal_projector.", "language_model.model.", "language_model.lm_head.weight"),
    ("model.multi_modal_projector.", "model.language_model.", "lm_head.weight"),
)
# PIL's integer resampling codes (HF stores `resample` as one) → our filter names.
_RESAMPLE_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box"}


def _llava_config(directory: str | Path) -> dict:
    """config.json with `vision_config` / `text_config` complete (transformers' defaults filled in
    only when a field the importers need is missing; that path imports transformers)."""
    hf = read_config(directory)
    if hf.get("model_type") not in MODEL_TYPES:
        raise unsupported("llava", "model_type", hf.get("model_type"), "supported: llava")
    sparse = any(
        not isinstance(hf.get(name), Mapping) or any(k not in hf[name] for k in required)
        for name, required in _REQUIRED.items()
    )
    if sparse:
        import transformers

        try:
            full = transformers.LlavaConfig.from_dict(hf).to_dict()
        except (ValueError, KeyError, TypeError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointImportError(f"{directory}/config.json: {first}") from None
        hf = {**full, **{k: v for k, v in hf.items() if k not in _REQUIRED}}
    return hf


def _feature_layer(hf: dict, depth: int) -> int:
    layer = hf.get("vision_feature_layer", -2)
    if isinstance(layer, (list, tuple)):
        raise unsupported(
            "llava",
            "vision_feature_layer",
            layer,
            "one layer only: concatenating several layers' features is not implemented",
        )
    if isinstance(layer, bool) or not isinstance(layer, int) or not -depth - 1 <= layer <= depth:
        raise unsupported(
            "llava", "vision_feature_layer", layer, f"an int in [-{depth + 1}, {depth}]"
        )
    return layer


def vlm_config(directory: str | Path) -> dict[str, dict]:
    """Config overrides `{block: {field: value}}` for a LLaVA directory.

    Blocks: `encoder`, `bridge`, `llm` (component fields, `name` included; dtypes, scan_layers and
    remat stay the user's), `data` (`image_token_id`) and `preprocessing` (ImagePreprocessing
    fields). `config.model` must be "vlm": `update_config` applies all of it.
    """
    return {
        **_components(_llava_config(directory)),
        "preprocessing": processor(directory).preprocessing,
    }


def _components(hf: dict) -> dict[str, dict]:
    """The `encoder`, `bridge`, `llm` and `data` blocks of `vlm_config` from a full config.json."""
    encoder = clip.architecture(hf["vision_config"])
    llm = llama.architecture(hf["text_config"])
    # LlavaConfig.__post_init__: a tied text config ties the whole model, and a tied LLaVA ties
    # its lm_head to the language model's embeddings.
    llm["tie_embeddings"] = bool(hf.get("tie_word_embeddings", False)) or llm["tie_embeddings"]
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in SELECT_STRATEGIES:
        raise unsupported(
            "llava", "vision_feature_select_strategy", strategy, "supported: default, full"
        )
    act = hf.get("projector_hidden_act", "gelu")
    if act not in PROJECTOR_ACTS:
        raise unsupported("llava", "projector_hidden_act", act, "supported: gelu")
    if not hf.get("multimodal_projector_bias", True):
        raise unsupported(
            "llava", "multimodal_projector_bias", False, "our projector always has biases"
        )
    token_id = hf.get("image_token_index", hf.get("image_token_id", 32000))
    if not isinstance(token_id, int) or not 0 <= token_id < llm["vocab_size"]:
        raise unsupported(
            "llava", "image_token_index", token_id, f"an id below vocab_size={llm['vocab_size']}"
        )
    return {
        "encoder": {
            "name": "vit",
            **encoder,
            "feature_layer": _feature_layer(hf, encoder["depth"]),
            "feature_norm": False,  # LLaVA reads hidden_states[k], before post_layernorm
        },
        "bridge": {
            "name": "mlp_projector",
            "projector": PROJECTOR_ACTS[act],
            "drop_class_token": strategy == "default",
        },
        "llm": {"name": "llama", **llm, "num_added_embeddings": 0},  # <image> is in the vocab
        "data": {"image_token_id": token_id},
    }


def update_config(config, overrides: Mapping[str, Mapping]) -> None:
    """Writes `vlm_config` overrides into `config` (a ConfigDict, locked or not) and sets
    `config.model = "vlm"`; fields the blocks lack are added."""
    with config.unlocked():
        config.model = "vlm"
        for block, fields in overrides.items():
            for key, value in fields.items():
                config[block][key] = value


class _LanguageModelView:
    """The LLM tensors of a LLaVA checkpoint under a plain `LlamaForCausalLM`'s names
    (`model.*`, `lm_head.weight`), so `llama.convert` reads them unchanged; takes go through the
    LLaVA checkpoint, whose accounting they count in."""

    def __init__(self, checkpoint: HFCheckpoint, body: str, head: str):
        self.directory = checkpoint.directory
        self._checkpoint, self._body, self._head = checkpoint, body, head
        self._names = {
            ("lm_head.weight" if key == head else "model." + key[len(body) :]): key
            for key in checkpoint.keys()
            if key == head or key.startswith(body)
        }

    def keys(self) -> list[str]:
        return sorted(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def take(self, name: str) -> np.ndarray:
        if name not in self._names:
            original = (
                self._head if name == "lm_head.weight" else self._body + name[len("model.") :]
            )
            raise CheckpointImportError(f"{self.directory}: tensor {original!r} is missing")
        return self._checkpoint.take(self._names[name])


def _layout(checkpoint: HFCheckpoint) -> tuple[str, str, str]:
    for layout in _LAYOUTS:
        if f"{layout[0]}linear_1.weight" in checkpoint:
            return layout
    raise CheckpointImportError(
        f"{checkpoint.directory}: no LLaVA projector tensor (expected one of "
        f"{[p + 'linear_1.weight' for p, _, _ in _LAYOUTS]})"
    )


def load_params(directory: str | Path, config: Mapping, expected: Mapping) -> dict[str, np.ndarray]:
    """`{"encoder/...", "bridge/...", "llm/...": numpy array}`: every tensor of a LLaVA directory.

    Args:
      directory: the HF LLaVA directory (config.json + safetensors).
      config: a mapping with `encoder`, `bridge` and `llm` blocks whose architecture fields equal
        `vlm_config(directory)`'s (the rest — scan_layers, dtypes, remat — are the user's).
      expected: `{path: shape-like}` of the whole model's parameters (paths as in
        `param_paths.flatten_params`); fresh parameters (`added_embedding`...) are not expected.

    Raises:
      CheckpointImportError naming differing config fields, or listing the checkpoint tensors
      left unused and the parameters left unfilled or mis-shaped.
    """
    from jaxvlm.importers import FRESH_PARAMETERS  # local: importers/__init__ imports this module
    from jaxvlm.param_paths import flatten_params

    derived = _components(_llava_config(directory))
    differing = sorted(
        f"{block}.{key}"
        for block in COMPONENTS
        for key, value in derived[block].items()
        if key not in config[block] or _plain(config[block][key]) != value
    )
    if differing:
        raise CheckpointImportError(
            f"{directory}: the config differs from its config.json in {differing} "
            "(take them from llava.vlm_config)"
        )
    checkpoint = HFCheckpoint(directory)
    projector, body, head = _layout(checkpoint)
    encoder_arch = {k: derived["encoder"][k] for k in clip.ARCHITECTURE_FIELDS}
    llm_arch = {k: derived["llm"][k] for k in llama.ARCHITECTURE_FIELDS}
    trees = {
        "encoder": clip.convert(checkpoint, encoder_arch, config["encoder"]),
        "bridge": {
            name: {
                "kernel": checkpoint.take(f"{projector}{name}.weight").T,
                "bias": checkpoint.take(f"{projector}{name}.bias"),
            }
            for name in ("linear_1", "linear_2")
        },
        "llm": llama.convert(_LanguageModelView(checkpoint, body, head), llm_arch, config["llm"]),
    }
    buffers = clip.IGNORED_SUFFIXES + llama.IGNORED_SUFFIXES
    checkpoint.finish(ignored=[k for k in checkpoint.keys() if k.endswith(buffers)])
    loaded = {
        f"{block}/{path}": value
        for block, tree in trees.items()
        for path, value in flatten_params(tree).items()
    }
    wanted = {
        k: v
        for k, v in expected.items()
        if k.split("/", 1)[0] in COMPONENTS and k.rsplit("/", 1)[-1] not in FRESH_PARAMETERS
    }
    check_filled(directory, loaded, wanted)
    return loaded


@dataclasses.dataclass(frozen=True)
class LlavaProcessorSpec:
    """What `LlavaProcessor` does to a prompt and its images.

    Attributes:
      preprocessing: `ImagePreprocessing` fields (image_size, resize, crop, mean, std, resample).
      image_token: the placeholder text ("<image>").
      num_image_tokens: placeholder tokens per image (= the projector's tokens per image).
    """

    preprocessing: dict
    image_token: str
    num_image_tokens: int

    def expand(self, text: str) -> str:
        """`text` with each image placeholder repeated `num_image_tokens` times, as
        `LlavaProcessor` rewrites it before tokenising (`tokenizer(expand(text))` gives its
        input_ids)."""
        return text.replace(self.image_token, self.image_token * self.num_image_tokens)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointImportError(f"{path}: invalid JSON ({error})") from None


def processor(directory: str | Path) -> LlavaProcessorSpec:
    """The processor files' preprocessing, `<image>` text and image-token count (see module doc).

    Settings absent from the files (or no processor files at all) fall back to the model's: its
    vision tower's patch size, image size and family (CLIP's or SigLIP's published normalisation),
    its select strategy, and one additional token for a CLIP tower's CLS.
    """
    directory = Path(directory).expanduser()
    hf = _llava_config(directory)
    vision = hf["vision_config"]
    siglip = str(vision["model_type"]).startswith("siglip")
    settings, image, source = {}, None, directory / "processor_config.json"
    if source.is_file():
        settings = _read_json(source)
        image = settings.get("image_processor")
    if image is None and (directory / "preprocessor_config.json").is_file():
        source = directory / "preprocessor_config.json"
        image = _read_json(source)
    fields = _preprocessing(image or {}, siglip, int(vision["image_size"]), source)
    patch = int(settings.get("patch_size") or vision["patch_size"])
    additional = settings.get("num_additional_image_tokens", 0 if siglip else 1)
    strategy = settings.get(
        "vision_feature_select_strategy", hf.get("vision_feature_select_strategy", "default")
    )
    size = fields["image_size"]
    count = (size // patch) ** 2 + int(additional) - (strategy == "default")
    model_count = _model_tokens_per_image(hf)
    if count != model_count:
        raise CheckpointImportError(
            f"{source}: the processor gives {count} image tokens per image (patch_size={patch}, "
            f"num_additional_image_tokens={additional}, strategy={strategy!r}) but the model's "
            f"projector gives {model_count}"
        )
    spec = LlavaProcessorSpec(
        preprocessing=fields,
        image_token=str(settings.get("image_token", "<image>")),
        num_image_tokens=count,
    )
    _check_image_token(directory, spec.image_token, hf)
    return spec


def _check_image_token(directory: Path, image_token: str, hf: dict) -> None:
    """The tokenizer (when the directory has one) maps `image_token` to `image_token_index`."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return
    import tokenizers

    found = tokenizers.Tokenizer.from_file(str(path)).token_to_id(image_token)
    wanted = hf.get("image_token_index", hf.get("image_token_id", 32000))
    if found != wanted:
        raise CheckpointImportError(
            f"{path}: {image_token!r} has id {found}, but config.json image_token_index={wanted}"
        )


def _model_tokens_per_image(hf: dict) -> int:
    arch = clip.architecture(hf["vision_config"])
    tokens = (arch["image_size"] // arch["patch_size"]) ** 2 + int(arch["class_token"])
    return tokens - (hf.get("vision_feature_select_strategy", "default") == "default")


def _preprocessing(image: dict, siglip: bool, vision_size: int, source: Path) -> dict:
    """Our ImagePreprocessing fields from an HF image-processor dict (defaults: the tower's
    family, CLIPImageProcessor's or SiglipImageProcessor's)."""
    from jaxvlm.data.preprocessing import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD

    def refuse(field, allowed):
        return CheckpointImportError(
            f"{source}: image processor field {field}={image.get(field)!r} is not supported "
            f"({allowed})"
        )

    if image.get("do_pad", False):
        raise refuse("do_pad", "padding to a square is not implemented")
    if not image.get("do_resize", True):
        raise refuse("do_resize", "our preprocessing always resizes to the tower's size")
    default = {"height": vision_size, "width": vision_size} if siglip else vision_size
    size = image.get("size", default)
    size = {"shortest_edge": size} if isinstance(size, int) else size
    crop = image.get("crop_size", {"height": vision_size, "width": vision_size})
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    do_crop = image.get("do_center_crop", not siglip)
    if set(size) == {"shortest_edge"}:
        side, resize = int(size["shortest_edge"]), "shortest_edge"
        if not do_crop or crop != {"height": side, "width": side}:
            raise refuse(
                "crop_size" if do_crop else "do_center_crop",
                f"a shortest_edge={side} resize needs a center crop of {side}x{side}",
            )
    elif set(size) == {"height", "width"} and size["height"] == size["width"]:
        side, resize = int(size["height"]), "squash"
        if do_crop and crop != {"height": side, "width": side}:
            raise refuse("crop_size", f"a {side}x{side} resize takes no other crop")
    else:
        raise refuse("size", "{shortest_edge: S} or a square {height: S, width: S}")
    if side != vision_size:
        raise refuse("size", f"the vision tower's image_size is {vision_size}")
    resample = image.get("resample", 3)
    resample = _RESAMPLE_CODES.get(resample, resample)
    if resample not in _RESAMPLE_CODES.values():
        raise refuse("resample", f"supported: {sorted(_RESAMPLE_CODES)} (PIL codes)")
    # (x · rescale − mean) / std  ==  (x/255 − mean') / std'  with mean', std' scaled by 1/(255·r).
    rescale = float(image.get("rescale_factor", 1 / 255)) if image.get("do_rescale", True) else 1.0
    factor = 1.0 if math.isclose(rescale * 255, 1.0, rel_tol=1e-9) else 1.0 / (255 * rescale)
    mean, std = (SIGLIP_MEAN, SIGLIP_STD) if siglip else (CLIP_MEAN, CLIP_STD)
    if image.get("do_normalize", True):
        mean, std = image.get("image_mean", mean), image.get("image_std", std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean = [mean] * 3 if isinstance(mean, (int, float)) else list(mean)
    std = [std] * 3 if isinstance(std, (int, float)) else list(std)
    return dict(
        image_size=side,
        resize=resize,
        crop="center" if resize == "shortest_edge" else "none",
        mean=tuple(float(m) * factor for m in mean),
        std=tuple(float(s) * factor for s in std),
        resample=resample,
    )


def _plain(value):
    value = value.to_dict() if hasattr(value, "to_dict") else value
    return list(value) if isinstance(value, tuple) else value

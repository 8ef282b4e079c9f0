"""Hugging Face checkpoint importers: one module per family, chosen by an explicit table.

A component whose `checkpoint` is a Hugging Face directory (config.json + safetensors; see
`manifest.detect_source_kind`) is imported in two steps:

1. `resolve_architectures(config)` (before the model is built, in `train`): the component's
   architecture fields come from `config.json` through its importer's `architecture`; the fields
   that are the user's (dtype, param_dtype, scan_layers, remat, implementation, added embeddings)
   are kept. A changed field is logged.
2. `load_component(component, directory, component_config, expected)` (in
   `initialization.load_pretrained`): the importer's table maps every tensor, with strict
   accounting — a checkpoint tensor left unused or a model parameter left unfilled is an error
   listing them. Parameters the model adds beyond the checkpoint (`num_added_embeddings` rows, e.g.
   LLaVA's `<image>`) are initialised fresh.

A component initialised from another model's checkpoint (`PARTIAL_IMPORTERS`: the Q-Former from
BERT) keeps its configured sizes — step 1 only checks them against config.json, naming each field
that differs — and step 2 fills what the checkpoint holds, the rest initialised fresh.

Parity of each family with the transformers PyTorch model is proven in `tests/importers/`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from jaxvlm.importers import bert_qformer, blip2, clip, llama, llava, opt, t5
from jaxvlm.importers.base import (
    CheckpointImportError,
    HFCheckpoint,
    LeadingRows,
    check_filled,
    read_config,
)
from jaxvlm.importers.gguf import GGUFCheckpoint

__all__ = [
    "IMPORTERS",
    "PARTIAL_IMPORTERS",
    "CheckpointImportError",
    "HFCheckpoint",
    "LeadingRows",
    "architecture",
    "load_component",
    "open_checkpoint",
    "vlm_importer",
    "resolve_architectures",
]

logger = logging.getLogger(__name__)

# config component → HF `model_type` → importer module (`architecture`, `convert`, `ignored_keys`).
IMPORTERS: dict[str, dict[str, ModuleType]] = {
    "encoder": {model_type: clip for model_type in clip.MODEL_TYPES},
    "llm": {
        **{model_type: llama for model_type in llama.MODEL_TYPES},
        **{model_type: opt for model_type in opt.MODEL_TYPES},
        **{model_type: t5 for model_type in t5.MODEL_TYPES},
    },
}
# Components initialised from another model's checkpoint (sizes checked, not taken; what the
# checkpoint lacks stays fresh). component → model_type → module with `check_architecture` and
# `load_component`.
PARTIAL_IMPORTERS: dict[str, dict[str, ModuleType]] = {
    "bridge": {model_type: bert_qformer for model_type in bert_qformer.MODEL_TYPES},
}
# Finished VLMs: one directory fills several components (`vlm_config` gives each one's fields,
# `load_params` all their tensors at once). model_type → importer.
VLM_IMPORTERS: dict[str, ModuleType] = {
    **{model_type: llava for model_type in llava.MODEL_TYPES},
    **{model_type: blip2 for model_type in blip2.MODEL_TYPES},
}
# Parameters a model may add beyond any checkpoint (initialised fresh, never imported).
FRESH_PARAMETERS = ("added_embedding", "added_kernel")


def _importer(component: str, model_type: str, source: str | Path) -> ModuleType:
    known = IMPORTERS.get(component, {})
    if model_type not in known:
        supported = ", ".join(sorted(known)) or "none yet"
        raise CheckpointImportError(
            f"{source}: model_type {model_type!r} cannot be imported as config.{component} "
            f"(supported: {supported})"
        )
    return known[model_type]


def open_checkpoint(source: str | Path) -> HFCheckpoint | GGUFCheckpoint:
    """An HF directory or a `.gguf` file (seen through its HF names) as a checkpoint."""
    if Path(source).expanduser().suffix == ".gguf":
        return GGUFCheckpoint(source)
    return HFCheckpoint(source)


def architecture(component: str, source: str | Path) -> dict:
    """Our architecture fields for `config.<component>` from an HF directory's config.json, or
    from a `.gguf` file's metadata."""
    if Path(source).expanduser().suffix == ".gguf":
        hf = GGUFCheckpoint(source).hf_config
    else:
        hf = read_config(source)
    if hf.get("model_type") in VLM_IMPORTERS:
        blocks = VLM_IMPORTERS[hf["model_type"]].vlm_config(source)
        if component not in blocks:
            raise CheckpointImportError(
                f"{source}: a {hf['model_type']} checkpoint has no config.{component} "
                f"(it fills {', '.join(b for b in blocks if b in ('encoder', 'bridge', 'llm'))})"
            )
        return dict(blocks[component])
    return _importer(component, hf.get("model_type"), source).architecture(hf)


def vlm_importer(source: str | Path) -> ModuleType | None:
    """The importer of a finished-VLM directory (LLaVA), or None for any other source."""
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        return None
    return VLM_IMPORTERS.get(read_config(path).get("model_type"))


def resolve_architectures(config) -> None:
    """Sets the architecture fields of every component whose checkpoint is an HF directory."""
    from jaxvlm import config_utils
    from jaxvlm.manifest import FrozenSourceError, detect_source_kind

    for component in config_utils.MODEL_COMPONENTS:
        if component not in config or "checkpoint" not in config[component]:
            continue
        if not config[component].checkpoint:
            continue
        source = config[component].checkpoint
        try:
            kind = detect_source_kind(source)
        except FrozenSourceError:
            continue  # reported, naming the component, when the sources are checked
        if kind not in ("hf", "gguf"):
            continue
        if kind == "hf":
            hf = read_config(source)
            partial = PARTIAL_IMPORTERS.get(component, {}).get(hf.get("model_type"))
            if partial is not None:
                partial.check_architecture(hf, config[component], source, component)
                continue
        fields = architecture(component, source)
        with config.unlocked():
            for key, value in fields.items():
                if key in config[component] and _plain(config[component][key]) != value:
                    logger.info(
                        "config.%s.%s = %r (from %s, was %r)",
                        *(component, key, value, source, _plain(config[component][key])),
                    )
                config[component][key] = value


def load_component(
    component: str, directory: str | Path, component_config: Mapping, expected: Mapping
) -> dict:
    """`{f"{component}/...": numpy array}` imported from an HF directory or a `.gguf` file.

    Args:
      component: the config block ("llm", "encoder", ...).
      directory: the HF model directory or `.gguf` file.
      component_config: `config.<component>` (its architecture must equal the checkpoint's:
        `resolve_architectures` makes it so).
      expected: `{path: shape-like}` of the whole model's parameters.
    """
    from jaxvlm.param_paths import flatten_params

    checkpoint = open_checkpoint(directory)
    partial = PARTIAL_IMPORTERS.get(component, {}).get(checkpoint.model_type)
    if partial is not None:
        return partial.load_component(checkpoint, component_config, expected, component)
    importer = _importer(component, checkpoint.model_type, directory)
    arch = importer.architecture(checkpoint.hf_config)
    absent = sorted(k for k in arch if k not in component_config)
    if absent:
        raise CheckpointImportError(
            f"{directory}: config.{component} lacks the architecture fields {absent}"
        )
    differing = sorted(k for k, v in arch.items() if _plain(component_config[k]) != v)
    if differing:
        raise CheckpointImportError(
            f"{directory}: config.{component} differs from its config.json in {differing} "
            "(leave them to the importer: `resolve_architectures`)"
        )
    tree = importer.convert(checkpoint, arch, component_config)
    checkpoint.finish(ignored=importer.ignored_keys(checkpoint))
    loaded = {f"{component}/{k}": v for k, v in flatten_params(tree).items()}
    wanted = {
        k: v
        for k, v in expected.items()
        if k.startswith(f"{component}/") and k.rsplit("/", 1)[-1] not in FRESH_PARAMETERS
    }
    check_filled(directory, loaded, wanted)
    return loaded


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value

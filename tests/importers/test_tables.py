"""Every importer table entry is reachable: a config.json of each `model_type` (transformers'
defaults) reaches its importer through `importers.architecture`, and every importer module offers
the functions `load_component` calls."""

import json

import pytest
import transformers

from jaxvlm import importers

ENTRIES = [
    (component, model_type)
    for component, table in importers.IMPORTERS.items()
    for model_type in table
]


def _write_config(directory, model_type):
    config = transformers.AutoConfig.for_model(model_type).to_dict()
    if model_type == "blip-2":  # no default <image> id: blip2-opt-2.7b's
        config["image_token_index"] = 50265
    elif "text_config" in config:  # LLaVA's defaults put <image> (32000) past Llama's 32000 rows;
        config["text_config"]["vocab_size"] = 32064  # llava-1.5-hf's padded vocabulary
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("component,model_type", ENTRIES)
def test_every_component_entry_reaches_its_importer(component, model_type, tmp_path):
    importer = importers.IMPORTERS[component][model_type]
    for function in ("architecture", "convert", "ignored_keys"):
        assert callable(getattr(importer, function)), f"{importer.__name__}.{function}"
    _write_config(tmp_path, model_type)
    fields = importers.architecture(component, tmp_path)
    assert fields and all(isinstance(key, str) for key in fields)


@pytest.mark.parametrize("model_type", list(importers.VLM_IMPORTERS))
def test_every_vlm_entry_reaches_its_importer(model_type, tmp_path):
    importer = importers.VLM_IMPORTERS[model_type]
    for function in ("vlm_config", "load_params", "processor", "update_config"):
        assert callable(getattr(importer, function)), f"{importer.__name__}.{function}"
    _write_config(tmp_path, model_type)
    assert importers.vlm_importer(tmp_path) is importer
    for component in ("encoder", "bridge", "llm"):
        assert importers.architecture(component, tmp_path)["name"]


def test_an_unknown_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(importers.CheckpointImportError, match=r"'gpt2'.*supported: .*llama"):
        importers.architecture("llm", tmp_path)

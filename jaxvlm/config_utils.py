"""Config helpers: typed config arguments, loading `configs/<name>.py` by path, cross-field validation.

Configs are `ml_collections.ConfigDict`s built by `get_config(arg)` in a file under `configs/`. The train CLI
loads them through `ml_collections.config_flags` (`--config path.py:arg`); the quickstart and the tests load
them through `load_config`, which calls the same `get_config(arg)` on the same file and locks the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

SIZES = ("tiny", "default", "paper")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `"stage=2,size=tiny"` into a ConfigDict typed like `defaults`.

    Every key must be one of `defaults`; values are converted to the type of the default (bool accepts
    true/false/1/0). A `size` key must be one of `SIZES`.
    """
    result = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"config argument {item!r} is not of the form key=value")
        if key not in defaults:
            raise ConfigError(
                f"unknown config argument {key!r}; allowed: {', '.join(sorted(defaults))}"
            )
        result[key] = _convert(key, value.strip(), defaults[key])
    if "size" in result and result["size"] not in SIZES:
        raise ConfigError(f"config argument size={result['size']!r}; allowed: {', '.join(SIZES)}")
    return ml_collections.ConfigDict(result)


def _convert(key: str, value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"config argument {key}={value!r} is not a boolean")
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"config argument {key}={value!r} is not an integer") from None
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config argument {key}={value!r} is not a number") from None
    return value


def split_config_spec(spec: str) -> tuple[str, str | None]:
    """`"configs/llava.py:stage=2"` → `("configs/llava.py", "stage=2")`."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` by path (never `import configs`), applies `overrides`, locks and validates.

    `overrides` maps dotted keys to values (`{"train.num_steps": 5}`); an unknown key raises, naming it.
    """
    path, arg = split_config_spec(spec)
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"jaxvlm_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config(arg)")
    config = module.get_config(arg)
    config.lock()
    for key, value in (overrides or {}).items():
        set_by_path(config, key, value)
    validate(config)
    return config


def load_sibling(config_file: str, name: str):
    """Loads `configs/<name>.py` next to `config_file` by path (shared blocks such as `common.py`).

    Configs are files, not a package (`import configs` is never used), so a config reaches its shared
    blocks through this, under a module name that cannot collide with an installed package.
    """
    import sys

    module_name = f"jaxvlm_configs.{name}"
    file = Path(config_file).resolve().parent / f"{name}.py"
    cached = sys.modules.get(module_name)
    if cached is not None and Path(cached.__file__) == file:
        return cached
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    return module


def find_configs_dir(configs_dir: str | None) -> Path:
    """`--configs-dir`, else the repository's `configs/` (an editable install)."""
    candidates = (
        [Path(configs_dir)]
        if configs_dir
        else [
            Path(__file__).resolve().parents[1] / "configs",
            Path.cwd() / "configs",
        ]
    )
    for candidate in candidates:
        if (candidate / "common.py").is_file():
            return candidate.absolute()
    raise FileNotFoundError(
        f"no configs directory found (looked in {', '.join(map(str, candidates))}); install from a "
        "clone with `pip install -e .` or pass --configs-dir"
    )


def set_by_path(config: ml_collections.ConfigDict, dotted_key: str, value: Any) -> None:
    """Sets `config.a.b = value`; a key that does not exist raises naming it."""
    *parents, leaf = dotted_key.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node:
            raise ConfigError(f"config.{'.'.join(parents[: i + 1])} does not exist")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"config.{dotted_key} does not exist")
    if isinstance(node[leaf], tuple) and isinstance(value, list):
        value = tuple(value)
    node[leaf] = value


def parse_override_value(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> Any:
    """A command-line value for `config.<dotted_key>`, converted to the type the field has."""
    current = get_by_path(config, dotted_key)
    if isinstance(current, tuple):
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if current is None or isinstance(current, str):
        return text
    return _convert(f"--config.{dotted_key}", text, current)


def split_override_args(args: list[str]) -> dict[str, str]:
    """`["--config.a.b=1", "--config.c", "2"]` → `{"a.b": "1", "c": "2"}`; anything else raises."""
    overrides, index = {}, 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognized argument {arg}")
        key, sep, value = arg[len("--config.") :].partition("=")
        if not sep:
            if index + 1 >= len(args):
                raise ConfigError(f"--config.{key} needs a value")
            index += 1
            value = args[index]
        overrides[key] = value
        index += 1
    return overrides


def get_by_path(config: Mapping[str, Any], dotted_key: str) -> Any:
    node: Any = config
    for part in dotted_key.split("."):
        node = node[part]
    return node


def to_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-able plain dict (tuples become lists)."""
    plain = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    return json.loads(json.dumps(plain, default=_json_default))


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    return str(value)


def config_hash(config: ml_collections.ConfigDict | Mapping[str, Any], length: int = 16) -> str:
    """A stable content hash of a config (cache keys for worlds and backbones)."""
    text = json.dumps(to_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# Component fields that never change parameter shapes or structure; every other field does.
NON_SHAPE_FIELDS = frozenset(
    {
        "checkpoint",
        "tokenizer",
        "label_smoothing",
        "temperature_init",
        "learn_temperature",
        "dtype",
        "param_dtype",
        "remat",
        "feature_layer",
        "implementation",
        "norm_eps",
        "rms_norm_eps",
        "rope_theta",
        "dropout",
    }
)
MODEL_COMPONENTS = ("encoder", "text_encoder", "llm", "bridge", "contrastive")


def make_source_paths_absolute(config: ml_collections.ConfigDict) -> None:
    """`config.init_from` and every component's `checkpoint` as absolute paths, so that a saved run
    resumes and evaluates from any current directory (INTERFACES.md §1)."""
    with config.unlocked():
        if config.init_from:
            config.init_from = str(Path(config.init_from).expanduser().absolute())
        for component in MODEL_COMPONENTS:
            if component in config and "checkpoint" in config[component]:
                if config[component].checkpoint:
                    path = Path(config[component].checkpoint).expanduser().absolute()
                    config[component].checkpoint = str(path)


def model_shape_keys(config: Mapping[str, Any]) -> list[str]:
    """Dotted paths of the config fields that decide parameter shapes (compared on restore)."""
    keys = ["model"]
    for component in MODEL_COMPONENTS:
        if component in config:
            keys += [
                f"{component}.{field}"
                for field in config[component]
                if field not in NON_SHAPE_FIELDS
            ]
    return keys


def validate(config: ml_collections.ConfigDict) -> None:
    """Cross-field checks; raises `ConfigError` naming the key and the value received."""
    from jaxvlm import (  # local: keep `import jaxvlm.config_utils` cheap
        models,
        objectives,
        sharding,
    )

    if config.model not in models.MODELS:
        raise ConfigError(
            f"config.model={config.model!r} is unknown; known: {', '.join(sorted(models.MODELS))}"
        )
    if config.objective not in objectives.OBJECTIVES:
        raise ConfigError(
            f"config.objective={config.objective!r} is unknown; known: "
            f"{', '.join(sorted(objectives.OBJECTIVES))}"
        )
    encoder_decoder = models.is_encoder_decoder(config)
    if config.objective in ("lm", "prefix_lm") and config.llm.name != "none":
        if encoder_decoder != (config.objective == "prefix_lm"):
            want = "prefix_lm" if encoder_decoder else "lm"
            raise ConfigError(
                f"config.objective={config.objective!r} does not fit config.llm.name="
                f"{config.llm.name!r}: an {'encoder-decoder' if encoder_decoder else 'decoder-only'}"
                f" LLM trains with objective {want!r}"
            )
    if encoder_decoder and config.data.task == "captions":
        raise ConfigError(
            "config.data.task='captions' has no targets to split for the encoder-decoder "
            f"config.llm.name={config.llm.name!r}"
        )
    unknown_axes = set(config.mesh) - set(sharding.MESH_AXES)
    if unknown_axes:
        raise ConfigError(f"config.mesh has unknown axes {sorted(unknown_axes)}")
    if config.data.batch_size <= 0:
        raise ConfigError(f"config.data.batch_size={config.data.batch_size} must be positive")
    accum = config.train.grad_accum_steps
    if accum < 1 or config.data.batch_size % accum:
        raise ConfigError(
            f"config.train.grad_accum_steps={accum} must be ≥ 1 and divide "
            f"config.data.batch_size={config.data.batch_size}"
        )
    if not config.trainable:
        raise ConfigError("config.trainable is empty: nothing would train")
    for pattern in config.trainable:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(
                f"config.trainable pattern {pattern!r} is not a regex: {error}"
            ) from None
    if config.optimizer.schedule not in ("cosine", "constant", "linear"):
        raise ConfigError(
            f"config.optimizer.schedule={config.optimizer.schedule!r}; allowed: cosine, constant, linear"
        )
    if config.optimizer.warmup_steps > config.train.num_steps:
        raise ConfigError(
            f"config.optimizer.warmup_steps={config.optimizer.warmup_steps} exceeds "
            f"config.train.num_steps={config.train.num_steps}"
        )
    for key in ("log_every", "checkpoint_every", "num_steps", "keep_checkpoints"):
        if config.train[key] < 1:
            raise ConfigError(f"config.train.{key}={config.train[key]} must be ≥ 1")
    if config.objective == "bridge_pretrain" and config.loss.itm and config.data.batch_size < 2:
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size}: ITM (config.loss.itm="
            f"{config.loss.itm}) needs a global batch of at least 2, so that a negative exists"
        )
    from jaxvlm.data.pipeline import AUGMENTATIONS

    if config.data.augment not in AUGMENTATIONS:
        raise ConfigError(
            f"config.data.augment={config.data.augment!r}; allowed: {', '.join(AUGMENTATIONS)}"
        )
    if config.data.augment != "none" and config.data.task != "captions":
        raise ConfigError(
            f"config.data.augment={config.data.augment!r} applies to the captions task only; "
            f"config.data.task={config.data.task!r}"
        )
    from jaxvlm.data.conversations import IMAGE_POSITIONS

    if config.data.image_position not in IMAGE_POSITIONS:
        raise ConfigError(
            f"config.data.image_position={config.data.image_position!r}; allowed: "
            f"{', '.join(IMAGE_POSITIONS)}"
        )
    validate_evals(config)
    models.validate_components(config)


def validate_evals(config: ml_collections.ConfigDict) -> None:
    """Every evaluator names a known type, known fields and an existing split."""
    from jaxvlm import evals
    from jaxvlm.data import SCENE_SPLITS

    for name, fields in config.evals.items():
        if fields.type not in evals.EVALUATORS:
            raise ConfigError(
                f"config.evals.{name}.type={fields.type!r} is unknown; known: "
                f"{', '.join(sorted(evals.EVALUATORS))}"
            )
        unknown = sorted(set(fields) - set(evals.EVALUATORS[fields.type].fields))
        if unknown:
            raise ConfigError(f"config.evals.{name} has unknown fields {unknown}")
        if fields.split not in SCENE_SPLITS:
            raise ConfigError(
                f"config.evals.{name}.split={fields.split!r}; splits: {', '.join(SCENE_SPLITS)}"
            )
        if fields.type == "retrieval":
            from jaxvlm.evals.retrieval import RERANKS

            if fields.rerank not in RERANKS:
                raise ConfigError(
                    f"config.evals.{name}.rerank={fields.rerank!r}; allowed: {', '.join(RERANKS)}"
                )
            if fields.rerank_k < 1:
                raise ConfigError(f"config.evals.{name}.rerank_k={fields.rerank_k} must be >= 1")
        if fields.type == "vqa" and "{question}" not in fields.prompt:
            raise ConfigError(f"config.evals.{name}.prompt has no {{question}} slot")
        if fields.batch_size < 1 or fields.every_steps < 0:
            raise ConfigError(f"config.evals.{name}: batch_size ≥ 1 and every_steps ≥ 0 required")

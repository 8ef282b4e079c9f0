"""Decoding defaults of a Hugging Face directory: `generation_config.json`, then `config.json`.

transformers builds a model's `GenerationConfig` from `generation_config.json` when the directory
has one, and from the generation fields of `config.json` otherwise (older checkpoints).
`generation_defaults(directory)` takes each field from the first of the two that gives it, looking
in a VLM's `text_config` too (LLaVA keeps its LLM's token ids there), so that a
`generation_config.json` that leaves out a token id still gets it from `config.json`; missing
fields take `GenerationConfig`'s own defaults: one beam, length_penalty 1.0, early_stopping False,
no special token ids.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxvlm.importers.base import CheckpointImportError

__all__ = ["GENERATION_CONFIG", "GenerationDefaults", "generation_defaults"]

GENERATION_CONFIG = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint says about decoding (HF `GenerationConfig` names in parentheses).

    eos_ids: the ids that end a sequence (`eos_token_id`, an int or a list); () if none.
    pad_id, bos_id: `pad_token_id`, `bos_token_id`; None if not given.
    decoder_start_id: the first decoder token of an encoder-decoder (`decoder_start_token_id`).
    num_beams, length_penalty, early_stopping: beam search settings (early_stopping True, False
      or "never").
    """

    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    bos_id: int | None = None
    decoder_start_id: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointImportError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointImportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_id(value: Any, field: str, source: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointImportError(f"{source}: {field}={value!r} is not a token id")
    return value


def generation_defaults(directory: str | Path) -> GenerationDefaults:
    """The decoding defaults of a Hugging Face model directory (see the module docstring).

    Each field comes from the first of `generation_config.json`, `config.json` and
    `config.json["text_config"]` that gives it a non-null value. A directory with neither file
    gives `GenerationDefaults()`.

    Raises:
      CheckpointImportError: one line naming the file and the field, for a value that is not a
        token id, a num_beams below 1, or an early_stopping other than true, false or "never".
    """
    directory = Path(directory).expanduser()
    generation = _read_json(directory / GENERATION_CONFIG)
    config = _read_json(directory / "config.json")
    text_config = config.get("text_config") or {}
    sources = [
        (directory / GENERATION_CONFIG, generation),
        (directory / "config.json", config),
        (directory / "config.json", text_config if isinstance(text_config, dict) else {}),
    ]

    def lookup(field: str) -> tuple[Any, Path | None]:
        for path, values in sources:
            if values.get(field) is not None:
                return values[field], path
        return None, None

    def token(field: str) -> int | None:
        value, path = lookup(field)
        return _token_id(value, field, path)

    eos, eos_source = lookup("eos_token_id")
    eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
    eos_ids = tuple(_token_id(value, "eos_token_id", eos_source) for value in eos_list)

    num_beams, source = lookup("num_beams")
    if num_beams is None:
        num_beams = 1
    elif isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise CheckpointImportError(f"{source}: num_beams={num_beams!r} must be an integer ≥ 1")
    length_penalty, source = lookup("length_penalty")
    if length_penalty is None:
        length_penalty = 1.0
    elif isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise CheckpointImportError(f"{source}: length_penalty={length_penalty!r} is not a number")
    early_stopping, source = lookup("early_stopping")
    if early_stopping is None:
        early_stopping = False
    elif not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise CheckpointImportError(
            f'{source}: early_stopping={early_stopping!r} must be true, false or "never"'
        )
    return GenerationDefaults(
        eos_ids=eos_ids,
        pad_id=token("pad_token_id"),
        bos_id=token("bos_token_id"),
        decoder_start_id=token("decoder_start_token_id"),
        num_beams=num_beams,
        length_penalty=float(length_penalty),
        early_stopping=early_stopping,
    )

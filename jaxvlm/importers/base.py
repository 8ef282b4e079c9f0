"""Reading a local Hugging Face model directory: `config.json` and safetensors, one tensor at a time.

No torch and no pickle: a safetensors file is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets"}}`) and the raw bytes, so each tensor is a memory-mapped
numpy view (bf16 through `ml_dtypes`) copied only when it is taken. Sharded checkpoints are read
through `model.safetensors.index.json`.

Strict key accounting: an importer `take`s every tensor it maps; `HFCheckpoint.finish` fails listing
every checkpoint key left unused, and `check_filled` every parameter of the model left unfilled, so a
wrong table can never load silently.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointImportError",
    "HFCheckpoint",
    "LeadingRows",
    "check_filled",
    "linear_kernel",
    "read_config",
    "unsupported",
]

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"
CONVERT_HINT = (
    "convert it once with transformers: `AutoModel.from_pretrained(DIR).save_pretrained(OUT, "
    "safe_serialization=True)`"
)


class CheckpointImportError(ValueError):
    """A checkpoint that cannot be imported (the message names the file, key or field)."""


@dataclasses.dataclass(frozen=True)
class LeadingRows:
    """A parameter of `shape` whose first `rows.shape[0]` rows come from a checkpoint; the others
    are initialised fresh (a vocabulary grown by added tokens: the Q-Former's `[DEC]`)."""

    rows: np.ndarray
    shape: tuple[int, ...]


def _read_header(path: Path) -> tuple[dict, int]:
    """(the safetensors header without `__metadata__`, the byte offset of the data)."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise CheckpointImportError(
                f"{path}: not a safetensors file (shorter than its header length)"
            )
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointImportError(f"{path}: not a safetensors file ({error})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def linear_kernel(weight: np.ndarray, kind: str, heads: int, head_dim: int) -> np.ndarray:
    """An HF `nn.Linear` weight [out, in] as our kernel: "dense" [in, out]; "heads_in" (q, k, v:
    [H·Dh, D]) → [D, H, Dh]; "heads_out" (o: [D, H·Dh]) → [H, Dh, D]."""
    if kind == "heads_in":
        return weight.T.reshape(-1, heads, head_dim)
    if kind == "heads_out":
        return weight.T.reshape(heads, head_dim, -1)
    if kind != "dense":
        raise ValueError(f"unknown kernel kind {kind!r}")
    return weight.T


def unsupported(family: str, field: str, value, allowed: str) -> CheckpointImportError:
    """The error for a config.json value an importer does not support (naming the field)."""
    return CheckpointImportError(
        f"config.json field {field}={value!r} is not supported by the {family} importer ({allowed})"
    )


def read_config(directory: str | Path) -> dict:
    """A Hugging Face directory's config.json as a dict (errors name the path)."""
    directory = Path(directory).expanduser()
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointImportError(f"{directory}: no such directory")
    if not path.is_file():
        raise CheckpointImportError(
            f"{directory}: no config.json (not a Hugging Face model directory)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointImportError(f"{path}: invalid JSON ({error})") from None


class HFCheckpoint:
    """A Hugging Face directory: `hf_config` (config.json as a dict) and its tensors by name.

    Args:
      directory: holds `config.json` and `model.safetensors`, or shards named by
        `model.safetensors.index.json`.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        self.hf_config = read_config(self.directory)
        self._files = self._weight_files()
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        for path in sorted(set(self._files.values())):
            header, offset = _read_header(path)
            for name, entry in header.items():
                self._entries[name] = (path, entry, offset)
        missing = sorted(name for name, path in self._files.items() if name not in self._entries)
        if missing:
            raise CheckpointImportError(
                f"{self.directory / INDEX_FILE} maps {len(missing)} tensors to files that lack "
                f"them: {missing[:5]}"
            )
        self._used: set[str] = set()

    def _weight_files(self) -> dict[str, Path]:
        """{tensor name: file} from the index, or every *.safetensors file's header."""
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: self.directory / file for name, file in weight_map.items()}
            absent = sorted({str(p) for p in files.values() if not p.is_file()})
            if absent:
                raise CheckpointImportError(f"{index} names shard files that are missing: {absent}")
            return files
        found = sorted(self.directory.glob("*.safetensors"))
        if not found:
            pickles = sorted(p.name for p in self.directory.glob("*.bin"))
            if pickles:
                raise CheckpointImportError(
                    f"{self.directory} holds only pickle weights ({', '.join(pickles)}): jaxvlm reads "
                    f"safetensors only (a pickle can run code); {CONVERT_HINT}"
                )
            raise CheckpointImportError(f"{self.directory}: no *.safetensors weights")
        return {name: path for path in found for name in _read_header(path)[0]}

    @property
    def model_type(self) -> str:
        return str(self.hf_config["model_type"]) if "model_type" in self.hf_config else ""

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def take(self, name: str) -> np.ndarray:
        """The tensor `name` as a host numpy array (its stored dtype), marked as used."""
        if name not in self._entries:
            raise CheckpointImportError(f"{self.directory}: tensor {name!r} is missing")
        path, entry, offset = self._entries[name]
        dtype = entry["dtype"]
        if dtype not in _DTYPES:
            raise CheckpointImportError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        start, stop = entry["data_offsets"]
        data = np.memmap(
            path, dtype=np.uint8, mode="r", offset=offset + start, shape=(stop - start,)
        )
        array = np.array(data.view(_DTYPES[dtype]).reshape(entry["shape"]))
        self._used.add(name)
        return array

    def finish(self, ignored: Iterable[str] = ()) -> None:
        """Fails listing every tensor never taken (other than `ignored`, e.g. rotary buffers)."""
        unused = sorted(set(self._entries) - self._used - set(ignored))
        if unused:
            raise CheckpointImportError(
                f"{self.directory}: {len(unused)} checkpoint tensors were not used by the "
                f"{self.model_type or 'model'} importer: {unused[:10]}"
            )


def check_filled(source: str | Path, loaded: Mapping[str, np.ndarray], expected: Mapping) -> None:
    """`loaded` ({path: array}) must fill exactly the `expected` ({path: shape-like}) params, with
    their shapes; the error lists every unfilled, unknown or mis-shaped parameter."""
    unfilled = sorted(set(expected) - set(loaded))
    unknown = sorted(set(loaded) - set(expected))
    shapes = sorted(
        f"{k} {tuple(loaded[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(loaded) & set(expected)
        if tuple(loaded[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if unfilled:
        problems.append(f"{len(unfilled)} parameters left unfilled: {unfilled[:10]}")
    if unknown:
        problems.append(f"{len(unknown)} parameters the model lacks: {unknown[:10]}")
    if shapes:
        problems.append(f"shapes that do not match (checkpoint vs model): {shapes[:10]}")
    if problems:
        raise CheckpointImportError(f"importing {source}: " + "; ".join(problems))

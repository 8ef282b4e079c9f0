"""The project's one tokenizer: a thin wrapper around a Hugging Face `tokenizers.Tokenizer`.

`tokenizer.json` is loaded and saved exactly as written (never through `AutoTokenizer`, which can
pick another tokenizer class and silently encode everything to []). Special-token names come from
the caller, else from `tokenizer_config.json` / `special_tokens_map.json` beside it, else from the
usual names found in the vocabulary (`<bos>`, `<s>`, ...). A tokenizer may carry the model's jinja
chat template (`chat_template`: `tokenizer_config.json`'s field or `chat_template.jinja`, as
transformers writes them); `save_directory` writes all of it back in those files.

`load_tokenizer(source)` reads the tokenizer a model ships with: an HF directory, a `.gguf` file or
a jaxvlm workdir. `world_tokenizer()` builds the word-level tokenizer of the synthetic world from
the grammar's word list, so its ids do not depend on any seed or sampled text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from jaxvlm.data import grammar

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 writes the template here

# World special tokens; "<pad>" is id 0. "<sep>", "<cls>", "<dec>" (BLIP-2 ITG), "<eoc>" (Flamingo
# end of chunk) and "<mask>" are reserved for bridges.
WORLD_SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<unk>",
    "<bos>",
    "<eos>",
    "<image>",
    "<sep>",
    "<cls>",
    "<dec>",
    "<eoc>",
    "<mask>",
)

_CANDIDATE_NAMES = {
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "[CLS]"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}

# Applied to the decoded string, so punctuation attaches: "a red circle." not "a red circle .".
_DECODE_REPLACEMENTS = (
    (" .", "."),
    (" ,", ","),
    (" ?", "?"),
    (" !", "!"),
    (" :", ":"),
    (" ;", ";"),
    (" )", ")"),
    ("( ", "("),
    (" ' ", "'"),
    (" - ", "-"),
    (" / ", "/"),
)


def _token_name(value) -> str | None:
    """A token name from a tokenizer_config value: a string or {"content": str, ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path) as file:
            value = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def _names_from_directory(directory: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for filename in ("special_tokens_map.json", TOKENIZER_CONFIG_FILE):
        path = os.path.join(directory, filename)
        if not os.path.exists(path):
            continue
        config = _read_json(path)
        for kind in _CANDIDATE_NAMES:
            name = _token_name(config.get(f"{kind}_token"))
            if name is not None:
                names[kind] = name  # tokenizer_config.json, read last, wins
    return names


def _chat_template_from_directory(directory: str) -> str | None:
    """`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (a string; a list of
    named templates gives the one named "default"), else None."""
    path = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.exists(path):
        with open(path) as file:
            return file.read()
    path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    if not os.path.exists(path):
        return None
    template = _read_json(path).get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


class Tokenizer:
    """Encodes text to ids and back; knows its pad/bos/eos/unk tokens.

    Attributes:
      tokenizer: the wrapped `tokenizers.Tokenizer`.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # the model's own jinja chat template, if it has one
        given = {"bos": bos_token, "eos": eos_token, "pad": pad_token, "unk": unk_token}
        self._names: dict[str, str | None] = {}
        for kind, candidates in _CANDIDATE_NAMES.items():
            name = given[kind]
            if name is None:
                name = next((c for c in candidates if tokenizer.token_to_id(c) is not None), None)
            elif tokenizer.token_to_id(name) is None:
                raise ValueError(f"{kind} token {name!r} is not in the tokenizer's vocabulary")
            self._names[kind] = name

    @classmethod
    def from_file(cls, path: str, **token_names: str | None) -> Tokenizer:
        """Loads a `tokenizer.json`; `token_names` (bos_token=..., ...) override the defaults."""
        if not os.path.exists(path):
            raise ValueError(f"tokenizer file {path} does not exist")
        tokenizer = tokenizers.Tokenizer.from_file(path)
        # The pipelines pad and truncate; a saved setting (sentence-transformers: pad to 128) goes.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(tokenizer, **token_names)

    @classmethod
    def from_directory(cls, directory: str) -> Tokenizer:
        """Loads `directory/tokenizer.json` with special-token names and the chat template from
        the HF files beside it (see the module docstring)."""
        directory = str(directory)
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise ValueError(
                f"{directory} has no {TOKENIZER_FILE} (jaxvlm reads tokenizers in the fast "
                "`tokenizers` format; save one with transformers' `tokenizer.save_pretrained`)"
            )
        names = _names_from_directory(directory)
        tokenizer = cls.from_file(path, **{f"{kind}_token": name for kind, name in names.items()})
        tokenizer.chat_template = _chat_template_from_directory(directory)
        return tokenizer

    def save(self, path: str) -> None:
        """Writes `tokenizer.json` (special tokens are found again by name on load)."""
        self.tokenizer.save(str(path))

    def save_directory(self, directory: str) -> None:
        """Writes `tokenizer.json` and `tokenizer_config.json` (the special-token names and the
        chat template), which `from_directory` reads back."""
        self.save(os.path.join(directory, TOKENIZER_FILE))
        config = {f"{kind}_token": name for kind, name in self._names.items() if name is not None}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w") as file:
            json.dump(config, file, indent=2)

    def encode(
        self,
        text: str,
        *,
        add_bos: bool = False,
        add_eos: bool = False,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """Ids of `text`; `add_special_tokens` runs the tokenizer's own post-processor.

        Raises:
          ValueError: when a non-blank text encodes to nothing (a broken tokenizer), or bos/eos
            is asked for but the tokenizer has none.
        """
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if not ids and text.strip():
            raise ValueError(f"tokenizer encoded the non-empty text {text[:50]!r} to no ids")
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """`encode` for many texts at once."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        result = []
        for text, encoding in zip(texts, encodings, strict=True):
            if not encoding.ids and text.strip():
                raise ValueError(f"tokenizer encoded the non-empty text {text[:50]!r} to no ids")
            result.append(self._wrap(encoding.ids, add_bos, add_eos))
        return result

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self._required("bos"), *ids]
        if add_eos:
            ids = [*ids, self._required("eos")]
        return ids

    def _required(self, kind: str) -> int:
        token_id = self._id(kind)
        if token_id is None:
            raise ValueError(f"this tokenizer has no {kind} token; pass {kind}_token=")
        return token_id

    def _id(self, kind: str) -> int | None:
        name = self._names[kind]
        return None if name is None else self.tokenizer.token_to_id(name)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int | None:
        return self._id("pad")

    @property
    def bos_id(self) -> int | None:
        return self._id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._id("eos")

    @property
    def unk_id(self) -> int | None:
        return self._id("unk")

    @property
    def special_token_names(self) -> dict[str, str | None]:
        """{"bos": name, "eos": ..., "pad": ..., "unk": ...}, None where absent."""
        return dict(self._names)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(int(token_id))

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Adds special tokens such as "<image>" (matched whole, never normalised); returns ids."""
        self.tokenizer.add_special_tokens(
            [tokenizers.AddedToken(token, special=True, normalized=False) for token in tokens]
        )
        return [self.tokenizer.token_to_id(token) for token in tokens]


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """The tokenizer a model ships with: a `.gguf` file's, a Hugging Face directory's
    (`tokenizer.json` + `tokenizer_config.json`), or a jaxvlm workdir's (also from one of its
    `checkpoints/<step>` directories)."""
    path = os.path.abspath(os.path.expanduser(str(source)))
    if path.endswith(".gguf"):
        from jaxvlm.importers import gguf  # local: needs the gguf package

        return gguf.tokenizer(path)
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints":  # a step directory of a workdir
        path = os.path.dirname(parent)
    elif os.path.basename(path) == "checkpoints":
        path = parent
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer source {source} is neither a directory nor a .gguf file")
    return Tokenizer.from_directory(path)


def world_tokenizer(extra_special_tokens: Sequence[str] = ()) -> Tokenizer:
    """The word-level tokenizer of the synthetic world.

    Ids: WORLD_SPECIAL_TOKENS first ("<pad>" = 0, "<unk>" = 1, "<bos>" = 2, "<eos>" = 3,
    "<image>" = 4, ...), then `grammar.grammar_words()` in sorted order, then
    `extra_special_tokens`. Text is lower-cased and stripped of accents, split on whitespace, every
    punctuation character is a token, and digit runs split from letters ("2nd" -> "2", "nd").
    """
    words = [w for w in grammar.grammar_words() if w not in WORLD_SPECIAL_TOKENS]
    specials = list(WORLD_SPECIAL_TOKENS)
    vocabulary = {token: index for index, token in enumerate(specials + words)}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=False),
        ]
    )
    # WordPiece (with a prefix no token has) joins tokens with spaces; Fuse makes one string.
    tokenizer.decoder = decoders.Sequence(
        [decoders.WordPiece(prefix="##", cleanup=False), decoders.Fuse()]
        + [decoders.Replace(old, new) for old, new in _DECODE_REPLACEMENTS]
    )
    tokenizer.add_special_tokens(
        [tokenizers.AddedToken(token, special=True, normalized=False) for token in specials]
    )
    wrapped = Tokenizer(tokenizer)
    if extra_special_tokens:
        wrapped.add_special_tokens(extra_special_tokens)
    return wrapped

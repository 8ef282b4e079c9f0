"""The project's one tokenizer: a thin wrapper around a Hugging Face `tokenizers.Tokenizer`.

`tokenizer.json` is loaded and saved exactly as written (never through `AutoTokenizer`, which can
pick another tokenizer class and silently encode everything to []). Special-token names come from
the caller, else from `tokenizer_config.json` / `special_tokens_map.json` beside it, else from the
usual names found in the vocabulary (`<bos>`, `<s>`, ...).

`world_tokenizer()` builds the word-level tokenizer of the synthetic world from the grammar's word
list, so its ids do not depend on any seed or sampled text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from jaxvlm.data import grammar

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


def _names_from_directory(directory: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, filename)
        if not os.path.exists(path):
            continue
        with open(path) as file:
            config = json.load(file)
        for kind in _CANDIDATE_NAMES:
            name = _token_name(config.get(f"{kind}_token"))
            if name is not None:
                names[kind] = name  # tokenizer_config.json, read last, wins
    return names


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
    ):
        self.tokenizer = tokenizer
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
        return cls(tokenizers.Tokenizer.from_file(path), **token_names)

    @classmethod
    def from_directory(cls, directory: str) -> Tokenizer:
        """Loads `directory/tokenizer.json` with special-token names from the HF config files."""
        names = _names_from_directory(directory)
        return cls.from_file(
            os.path.join(directory, "tokenizer.json"),
            **{f"{kind}_token": name for kind, name in names.items()},
        )

    def save(self, path: str) -> None:
        """Writes `tokenizer.json` (special tokens are found again by name on load)."""
        self.tokenizer.save(str(path))

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

"""Conversations as token ids: the one chat-template representation, loss masks and image slots.

A template is a jinja chat-template string (the form Hugging Face and GGUF files ship, rendered
the same way: sandboxed, `trim_blocks`, `lstrip_blocks`) plus the variables LLaVA's conversation
objects hold: `system_message`, `roles` (our role names → the template's), `separator`, and the
`stop` string that ends an assistant turn. HF templates ignore the extra variables; ours use them.

LLaVA §3 / Vicuna v0 (`SeparatorStyle.SINGLE`): `{system}###Human: {q}###Assistant: {a}###...`
with `###` the stop string. The loss covers each assistant turn's text and its stop string, found
by rendering prefixes: assistant turn i spans from the end of `render(messages[:i],
add_generation_prompt=True)` to the end of `render(messages[:i + 1])`. Each span is tokenised on
its own and the concatenation must equal the tokenisation of the whole text, or
`TokenizationMismatch` names the sample (LLaVA's own code only warns and drops the sample's loss).

Images: each image placeholder (`<image>`) in the text becomes `tokens_per_image` copies of the
placeholder id, which `vlm.py` replaces by the bridge's tokens. When no user turn holds a
placeholder, `place_images` puts them at the start of the first user turn (LLaVA's position).

Generation: `encode_prompt` gives a prompt's ids, `encode_stop` the ids the decode loop stops on,
and `decode_answer` turns generated ids into the answer text (the one place that does).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence

import jinja2
import jinja2.sandbox
import numpy as np

from jaxvlm.data.tokenizer import Tokenizer

__all__ = [
    "ChatTemplate",
    "EncodedConversation",
    "TokenizationMismatch",
    "decode_answer",
    "encode_conversation",
    "encode_prompt",
    "encode_stop",
    "expand_image_tokens",
    "from_llava_turns",
    "place_images",
    "truncate_at_stop",
]

ROLES = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"


class TokenizationMismatch(ValueError):
    """Tokenising a conversation span by span differs from tokenising it whole."""


@functools.cache
def _compile(source: str) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(source)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A jinja chat template and the variables it is rendered with.

    Attributes:
      template: jinja source; sees `messages` ([{"role", "content"}]), `add_generation_prompt`,
        `bos_token`, `eos_token` and the fields below.
      system_message: the system prompt (LLaVA's Vicuna v0 one, or "").
      roles: {"user": printed name, "assistant": printed name}.
      separator: what the template writes between turns (Vicuna v0: "###").
      stop: the string that ends an assistant turn; generation stops on it.
      image_placeholder: the text of one image slot in a prompt.
    """

    template: str
    system_message: str = ""
    roles: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"user": "Human", "assistant": "Assistant"}
    )
    separator: str = "###"
    stop: str = "###"
    image_placeholder: str = IMAGE_PLACEHOLDER

    @classmethod
    def from_config(cls, config) -> ChatTemplate:
        """From `config.template` (a ConfigDict or dict with these field names)."""
        fields = dict(config)
        unknown = set(fields) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"config.template has unknown fields {sorted(unknown)}")
        if "roles" in fields:
            fields["roles"] = dict(fields["roles"])
        return cls(**fields)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "roles": dict(self.roles)}

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool,
        bos_token: str = "",
        eos_token: str = "",
    ) -> str:
        """The template applied to `messages`; with `add_generation_prompt` the text ends where
        the assistant's answer starts."""
        for index, message in enumerate(messages):
            if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise ValueError(
                    f"message {index} must be {{'role': one of {ROLES}, 'content': str}}; got "
                    f"{json.dumps(message)[:100]}"
                )
        return _compile(self.template).render(
            messages=[dict(message) for message in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            system_message=self.system_message,
            roles=dict(self.roles),
            separator=self.separator,
        )


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    """ids: int32[L]; loss_mask: int32[L], 1 on assistant tokens (and their stop string)."""

    ids: np.ndarray
    loss_mask: np.ndarray


def from_llava_turns(turns: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """LLaVA-Instruct turns ({"from": "human" | "gpt", "value"}) as chat messages."""
    names = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": names[turn["from"]], "content": turn["value"]} for turn in turns]


def place_images(
    messages: Sequence[Mapping[str, str]], num_images: int, placeholder: str = IMAGE_PLACEHOLDER
) -> list[dict[str, str]]:
    """Puts `num_images` placeholders at the start of the first user turn when no user turn has
    one; a text that has some must have exactly `num_images`."""
    messages = [dict(message) for message in messages]
    found = sum(m["content"].count(placeholder) for m in messages if m["role"] == "user")
    if found == 0 and num_images:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise ValueError("the conversation has no user turn to place the images in")
        first["content"] = f"{placeholder}\n" * num_images + first["content"]
    elif found != num_images:
        raise ValueError(
            f"the prompt holds {found} {placeholder} placeholders for {num_images} images"
        )
    return messages


def _special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    names = tokenizer.special_token_names
    return {"bos_token": names["bos"] or "", "eos_token": names["eos"] or ""}


def _encode_pieces(
    tokenizer: Tokenizer, pieces: list[tuple[str, int]], sample_index: int
) -> tuple[list[int], list[int]]:
    ids, loss_mask = [], []
    for text, is_target in pieces:
        piece_ids = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += piece_ids
        loss_mask += [is_target] * len(piece_ids)
    whole = tokenizer.encode("".join(text for text, _ in pieces), add_special_tokens=False)
    if whole != ids:
        first = next(
            (i for i, (a, b) in enumerate(zip(whole, ids, strict=False)) if a != b),
            min(len(whole), len(ids)),
        )
        raise TokenizationMismatch(
            f"sample {sample_index}: tokenising the conversation turn by turn gives {len(ids)} ids "
            f"but the whole text gives {len(whole)} (first difference at id {first}); the chat "
            "template's separators must fall on token boundaries"
        )
    return ids, loss_mask


def expand_image_tokens(
    ids: Sequence[int], loss_mask: Sequence[int], image_token_id: int, tokens_per_image: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each `image_token_id` becomes `tokens_per_image` copies (never a target)."""
    ids = np.asarray(ids, np.int32)
    loss_mask = np.asarray(loss_mask, np.int32)
    is_image = ids == image_token_id
    repeats = np.where(is_image, tokens_per_image, 1)
    return np.repeat(ids, repeats), np.repeat(np.where(is_image, 0, loss_mask), repeats)


def encode_conversation(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    messages: Sequence[Mapping[str, str]],
    *,
    image_token_id: int,
    tokens_per_image: int,
    sample_index: int = -1,
) -> EncodedConversation:
    """A training conversation: ids with expanded image slots and the assistant-only loss mask.

    Raises:
      TokenizationMismatch: naming `sample_index`.
      ValueError: when the template does not render prefixes as prefixes of the whole.
    """
    special = _special_tokens(tokenizer)
    whole = template.render(messages, add_generation_prompt=False, **special)
    pieces, start = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:index], add_generation_prompt=True, **special)
        with_answer = template.render(messages[: index + 1], add_generation_prompt=False, **special)
        if not (whole.startswith(with_answer) and with_answer.startswith(prompt)):
            raise ValueError(
                f"sample {sample_index}: the chat template does not render turn {index} as a "
                "prefix of the whole conversation, so the assistant tokens cannot be found"
            )
        pieces += [(whole[start : len(prompt)], 0), (whole[len(prompt) : len(with_answer)], 1)]
        start = len(with_answer)
    pieces.append((whole[start:], 0))
    ids, loss_mask = _encode_pieces(tokenizer, pieces, sample_index)
    ids, loss_mask = expand_image_tokens(ids, loss_mask, image_token_id, tokens_per_image)
    return EncodedConversation(ids, loss_mask)


def encode_prompt(
    tokenizer: Tokenizer,
    template: ChatTemplate | None,
    messages: Sequence[Mapping[str, str]],
    *,
    num_images: int,
    image_token_id: int | None,
    tokens_per_image: int,
) -> np.ndarray:
    """Prompt ids for generation: the conversation so far, ending where the assistant answers.

    With a template, images are placed as in training (`place_images`) and the text ends with the
    assistant's generation prompt. With `template=None` the last user message is encoded exactly
    as `tokenizer(text)` would (its own special tokens), and it must hold one placeholder per image.
    """
    if template is None:
        text = messages[-1]["content"]
        ids = tokenizer.encode(text, add_special_tokens=True)
        found = 0 if image_token_id is None else ids.count(image_token_id)
        if found != num_images:
            raise ValueError(
                f"the prompt holds {found} image placeholders for {num_images} images; without "
                "a chat template (--no-template, or a model that ships none) write one <image> "
                "per image"
            )
    else:
        messages = place_images(messages, num_images, template.image_placeholder)
        text = template.render(messages, add_generation_prompt=True, **_special_tokens(tokenizer))
        ids = tokenizer.encode(text, add_special_tokens=False)
    if image_token_id is None:
        return np.asarray(ids, np.int32)
    return expand_image_tokens(ids, np.zeros(len(ids)), image_token_id, tokens_per_image)[0]


def truncate_at_stop(ids: Sequence[int], stop_ids: Sequence[int], eos_id: int | None) -> list[int]:
    """Generated ids up to (not including) the first EOS or the first run of `stop_ids`."""
    ids = [int(i) for i in ids]
    end = len(ids)
    if eos_id is not None and eos_id in ids:
        end = ids.index(eos_id)
    width = len(stop_ids)
    if width:
        for start in range(0, end - width + 1):
            if ids[start : start + width] == list(stop_ids):
                end = start
                break
    return ids[:end]


def encode_stop(tokenizer: Tokenizer, stop: str) -> tuple[int, ...]:
    """The ids generation stops on: the stop string tokenised alone (() for no stop string)."""
    return tuple(tokenizer.encode(stop)) if stop else ()


def decode_answer(tokenizer: Tokenizer, ids: Sequence[int], stop: str) -> str:
    """The answer text of generated ids: the one place generations become text (the generative
    evaluators and `generate.answer`).

    The ids are cut before the first EOS or run of the stop string's ids (`truncate_at_stop`),
    decoded without special tokens, cut at the first `stop` in the text too (a stop string made of
    other ids), and stripped of surrounding whitespace. Cutting on ids comes first because a
    tokenizer need not decode the stop ids back to `stop`: the world tokenizer decodes "###" as
    "# # #".
    """
    kept = truncate_at_stop(ids, encode_stop(tokenizer, stop), tokenizer.eos_id)
    text = tokenizer.decode(kept)
    if stop:
        text = text.split(stop, 1)[0]
    return text.strip()

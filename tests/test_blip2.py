"""BLIP-2 end to end on the tiny world, through `python -m jaxvlm.quickstart --bridges blip2`:
stage 1 trains the Q-Former alone (the ViT bit-identical), stage 2 starts from it through
`config.init_from` and trains it into the frozen LM and into the frozen T5, the VQA fine-tune feeds the question to the
Q-Former and trains the ViT too, and the "no stage 1" ablation starts from scratch."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CONFIGS

from jaxvlm import backbones, checkpoint, evaluate, initialization, models, sharding

RETRIEVAL_METRICS = {f"r{k}_{d}" for k in (1, 5, 10) for d in ("image_to_text", "text_to_image")}
ROWS = (
    "blip2_stage1",
    "blip2_stage2_decoder",
    "blip2_stage2_encdec",
    "blip2_vqa_ft",
    "blip2_no_stage1",
    "blind_blip2",
    "blind_blip2_t5",
)
GENERATIVE = {"vqa_accuracy", "cider"}


@pytest.fixture(scope="module")
def blip2_quickstart(tmp_path_factory, cache_dir):
    """A finished tiny `quickstart --bridges blip2` workdir and its metrics (~2 min)."""
    from jaxvlm import quickstart

    workdir = tmp_path_factory.mktemp("quickstart_blip2")
    overrides = {"blip2": {"train.num_steps": 3, "train.progress_bar": False}}
    data = quickstart.run(
        workdir, cache_dir, CONFIGS, bridges=("blip2",), size="tiny", overrides=overrides
    )
    return workdir, data


def _initial_params(config, workdir, cache_dir):
    backbones.resolve_sources(config, cache_dir)
    mesh = sharding.make_mesh(config.mesh)
    setup = initialization.setup_state(config, models.build_model(config), mesh, workdir, cache_dir)
    return jax.device_get(setup.state.params)


def _run(workdir, cache_dir):
    run = evaluate.load_run(workdir, cache_dir=cache_dir)
    return run.config, jax.device_get(run.params)


def _changed(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return not all(jnp.array_equal(x, y) for x, y in pairs)


@pytest.mark.slow
def test_quickstart_writes_the_blip2_rows(blip2_quickstart):
    _, data = blip2_quickstart
    results = data["results"]
    for row in ROWS:
        assert set(results[row]) == {"test", "test_novel"}, row
    for split in ("test", "test_novel"):
        assert set(results["blip2_stage1"][split]) == RETRIEVAL_METRICS
        for row in ("blip2_stage2_decoder", "blip2_stage2_encdec", "blip2_no_stage1"):
            assert set(results[row][split]) == GENERATIVE
        assert set(results["blip2_vqa_ft"][split]) == {"vqa_accuracy"}
        assert set(results["blind_blip2"][split]) == set(results["blind_blip2_t5"][split])
        assert set(results["blind_blip2"][split]) == GENERATIVE
        values = [v for row in ROWS for v in results[row][split].values()]
        assert all(0.0 <= value <= 100.0 for value in values)
    assert "blip2_no_stage1" in data["timings_s"]


@pytest.mark.slow
def test_stage1_trains_the_qformer_alone_and_reports_retrieval(
    blip2_quickstart, tmp_path, cache_dir
):
    workdir, data = blip2_quickstart
    config, after = _run(workdir / "blip2_stage1", cache_dir)
    assert config.llm.name == "none" and config.objective == "bridge_pretrain"
    assert config.evals.retrieval.rerank == "itm"  # ITC candidates re-ranked by ITM
    before = _initial_params(config, tmp_path / "fresh", cache_dir)
    # The frozen ViT is exactly the cached backbone's; the checkpoint holds the bridge alone.
    chex.assert_trees_all_equal(after["encoder"], before["encoder"])
    assert _changed(after["bridge"]["query_tokens"], before["bridge"]["query_tokens"])
    assert set(checkpoint.read_params(workdir / "blip2_stage1")) == {
        k for k in checkpoint.flatten_params(after) if k.startswith("bridge/")
    }
    # `evaluate` restores it with the frozen ViT from its manifest and scores the same.
    scored = evaluate.evaluate_workdir(workdir / "blip2_stage1", split="test", cache_dir=cache_dir)
    assert scored["metrics"] == pytest.approx(data["results"]["blip2_stage1"]["test"])


@pytest.mark.slow
def test_stage2_starts_from_stage1_and_keeps_the_llm_frozen(blip2_quickstart, tmp_path, cache_dir):
    workdir, _ = blip2_quickstart
    _, stage1 = _run(workdir / "blip2_stage1", cache_dir)
    config, after = _run(workdir / "blip2_stage2_decoder", cache_dir)
    before = _initial_params(config, tmp_path / "fresh", cache_dir)
    # init_from loads the stage-1 Q-Former; language_projection is new.
    chex.assert_trees_all_equal(before["bridge"]["query_tokens"], stage1["bridge"]["query_tokens"])
    assert "language_projection" in before["bridge"]
    assert "language_projection" not in stage1["bridge"]
    chex.assert_trees_all_equal(after["llm"], before["llm"])
    chex.assert_trees_all_equal(after["encoder"], before["encoder"])
    # The stage-1 heads are out of the optimizer (no weight decay on what has no gradient).
    chex.assert_trees_all_equal(after["bridge"]["itm_head"], before["bridge"]["itm_head"])
    assert _changed(after["bridge"]["language_projection"], before["bridge"]["language_projection"])
    assert config.evals.vqa.num_beams == 5 and config.evals.vqa.length_penalty == -1.0
    assert config.evals.vqa.prompt == "Question: {question} Answer:"


@pytest.mark.slow
def test_encoder_decoder_stage2_trains_into_the_frozen_world_t5(
    blip2_quickstart, tmp_path, cache_dir
):
    """Stage 2 into the T5 the world's text pretrained (built because this job names it): the
    prefix LM, the FlanT5 prompt, the T5 frozen, the Q-Former from stage 1."""
    workdir, data = blip2_quickstart
    _, stage1 = _run(workdir / "blip2_stage1", cache_dir)
    config, after = _run(workdir / "blip2_stage2_encdec", cache_dir)
    assert config.llm.name == "t5" and config.objective == "prefix_lm"
    assert config.data.prefix_split == "random"
    assert config.evals.vqa.prompt == "Question: {question} Short answer:"
    t5 = checkpoint.read_params(config.llm.checkpoint)  # the cached backbone's workdir
    assert t5 and all(key.startswith("llm/") for key in t5)
    before = _initial_params(config, tmp_path / "fresh", cache_dir)
    chex.assert_trees_all_equal(before["bridge"]["query_tokens"], stage1["bridge"]["query_tokens"])
    chex.assert_trees_all_equal(after["llm"], before["llm"])
    flat = checkpoint.flatten_params(after)
    for key, value in t5.items():
        np.testing.assert_array_equal(flat[key], value)
    assert _changed(after["bridge"]["language_projection"], before["bridge"]["language_projection"])
    losses = [
        json.loads(line) for line in (workdir / "blip2_stage2_encdec" / "metrics.jsonl").open()
    ]
    assert any("train/unsplit_fraction" in record for record in losses)


@pytest.mark.slow
def test_vqa_finetune_trains_qformer_and_vit_with_the_llm_frozen(
    blip2_quickstart, tmp_path, cache_dir
):
    """`stage=vqa` (BLIP-2 §4.3): the question reaches the Q-Former, whose query path trains; the
    LLM, the stage-1 heads and (below size=paper) the ViT do not."""
    workdir, _ = blip2_quickstart
    config, after = _run(workdir / "blip2_vqa_ft", cache_dir)
    assert config.bridge.read_prompt
    before = _initial_params(config, tmp_path / "fresh", cache_dir)
    chex.assert_trees_all_equal(after["llm"], before["llm"])
    chex.assert_trees_all_equal(after["encoder"], before["encoder"])
    chex.assert_trees_all_equal(after["bridge"]["itm_head"], before["bridge"]["itm_head"])
    # The question's word embeddings move: the Q-Former reads it.
    assert _changed(after["bridge"]["word_embeddings"], before["bridge"]["word_embeddings"])
    saved = checkpoint.read_params(workdir / "blip2_vqa_ft")
    assert not any(key.startswith(("llm/", "encoder/", "bridge/itm_head")) for key in saved)


@pytest.mark.slow
def test_no_stage1_ablation_starts_from_a_fresh_qformer(blip2_quickstart, tmp_path, cache_dir):
    """The paper's ablation: the same stage 2, its Q-Former freshly initialised."""
    workdir, _ = blip2_quickstart
    _, stage1 = _run(workdir / "blip2_stage1", cache_dir)
    config, after = _run(workdir / "blip2_no_stage1", cache_dir)
    assert config.init_from == "" and config.objective == "lm"
    before = _initial_params(config, tmp_path / "fresh", cache_dir)
    assert _changed(before["bridge"]["query_tokens"], stage1["bridge"]["query_tokens"])
    assert _changed(after["bridge"]["query_tokens"], before["bridge"]["query_tokens"])
    chex.assert_trees_all_equal(after["llm"], before["llm"])


def test_stage2_rows_are_bos_queries_caption_eos_with_the_loss_on_the_caption(tiny_config):
    from jaxvlm.data import chat
    from jaxvlm.data.tokenizer import world_tokenizer

    config = tiny_config("blip2", stage=2)
    tokenizer = world_tokenizer()
    template = chat.ChatTemplate.from_config(config.template)
    (prompt,) = config.data.caption_prompts
    user = chat.place_images([{"role": "user", "content": prompt}], 1)[0]
    messages = [user, {"role": "assistant", "content": "a red circle"}]
    encoded = chat.encode_conversation(
        tokenizer, template, messages, image_token_id=config.data.image_token_id, tokens_per_image=4
    )
    caption = tokenizer.encode("a red circle")
    image = config.data.image_token_id
    expected = [tokenizer.bos_id, image, image, image, image, *caption, tokenizer.eos_id]
    assert encoded.ids.tolist() == expected
    assert encoded.loss_mask.tolist() == [0] * 5 + [1] * (len(caption) + 1)
    # Generation prompts put the query slots before the text too (BLIP-2's processor).
    ids = chat.encode_prompt(
        tokenizer,
        template,
        [{"role": "user", "content": "Question: what color is the circle? Answer:"}],
        num_images=1,
        image_token_id=image,
        tokens_per_image=4,
    )
    assert ids.tolist()[:5] == [tokenizer.bos_id, image, image, image, image]
    assert tokenizer.decode(ids[5:]) == "question: what color is the circle? answer:"

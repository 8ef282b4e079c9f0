"""The LLaVA recipe end to end: what each stage trains, evaluation with the blind baseline, --data."""

import json

import chex
import jax
import numpy as np
import pytest

from jaxvlm import checkpoint, data, evaluate, train


@pytest.fixture(scope="module")
def stages(tmp_path_factory, cache_dir, tiny_config):
    """Tiny stage 1 then stage 2 from it (3 steps each, no end-of-run evaluation)."""
    root = tmp_path_factory.mktemp("llava")
    no_evals = {"evals.vqa.every_steps": 0, "evals.caption.every_steps": 0}
    stage1 = tiny_config("llava", no_evals, stage=1)
    first = train.train(stage1, root / "stage1", cache_dir=cache_dir)
    stage2 = tiny_config("llava", {**no_evals, "init_from": str(root / "stage1")}, stage=2)
    second = train.train(stage2, root / "stage2", cache_dir=cache_dir)
    return root, stage1, first, second


def _flat(tree, prefix):
    return {
        k: np.asarray(v) for k, v in checkpoint.flatten_params(tree).items() if k.startswith(prefix)
    }


def test_stage1_leaves_the_llm_bit_identical_and_stage2_changes_it(stages):
    _, stage1, first, second = stages
    source = {
        k: v
        for k, v in checkpoint.read_params(stage1.llm.checkpoint).items()
        if k.startswith("llm/")
    }
    after_stage1 = _flat(jax.device_get(first["state"].params), "llm/")
    chex.assert_trees_all_equal(after_stage1, source)
    after_stage2 = _flat(jax.device_get(second["state"].params), "llm/")
    changed = [k for k in source if not np.array_equal(after_stage2[k], source[k])]
    assert len(changed) == len(source)  # every LLM tensor trains in stage 2


def test_stage2_starts_from_the_stage1_projector(stages, tiny_config):
    root, _, first, _ = stages
    projector = _flat(jax.device_get(first["state"].params), "bridge/")
    saved = {
        k: v for k, v in checkpoint.read_params(root / "stage1").items() if k.startswith("bridge/")
    }
    chex.assert_trees_all_equal(projector, saved)
    stage2 = tiny_config("llava", {"init_from": str(root / "stage1")}, stage=2)
    assert stage2.trainable == ("bridge/.*", "llm/.*")


def test_evaluate_json_has_metrics_and_blind(stages, cache_dir, capsys):
    root = stages[0]
    evaluate.main(
        [
            "--workdir",
            str(root / "stage2"),
            "--json",
            "--split",
            "test_novel",
            "--cache-dir",
            str(cache_dir),
            "--config.evals.vqa.num_examples=5",
            "--config.evals.caption.num_examples=3",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"checkpoint", "step", "split", "metrics", "blind"}
    assert result["split"] == "test_novel" and result["step"] == 3
    assert set(result["metrics"]) == set(result["blind"]) == {"vqa_accuracy", "cider"}
    assert all(0 <= value <= 100 * 10 for value in result["metrics"].values())


def test_evaluate_data_scores_a_world_built_with_another_seed(stages, cache_dir, tmp_path, capsys):
    root, stage1 = stages[0], stages[1]
    fields = {**dict(stage1.data.world), "seed": 1}
    other = data.write_world(data.WorldConfig.from_dict(fields), tmp_path / "world_seed1")
    argv = ["--workdir", str(root / "stage2"), "--json", "--cache-dir", str(cache_dir)]
    argv += [
        "--no-blind",
        "--config.evals.vqa.num_examples=4",
        "--config.evals.caption.num_examples=2",
    ]
    evaluate.main([*argv, "--data", str(other.path)])
    result = json.loads(capsys.readouterr().out)
    assert result["blind"] == {} and set(result["metrics"]) == {"vqa_accuracy", "cider"}
    with pytest.raises(SystemExit):
        evaluate.main([*argv, "--data", str(tmp_path / "missing")])
    error = capsys.readouterr().err.strip()
    assert "--data" in error and "missing" in error and len(error.splitlines()) == 1


def test_evaluate_verify_rehashes_the_frozen_sources(stages, cache_dir, capsys):
    root = stages[0]
    argv = [
        "--workdir",
        str(root / "stage1"),
        "--verify",
        "--no-blind",
        "--cache-dir",
        str(cache_dir),
    ]
    evaluate.main(
        [*argv, "--config.evals.vqa.num_examples=2", "--config.evals.caption.num_examples=2"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert {line.split("\t")[0] for line in lines} == {"vqa_accuracy", "cider"}

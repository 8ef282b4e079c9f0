"""Bad input gets a clear error naming the problem, and nothing is lost."""

import json
import shutil

import pytest

from jaxvlm import checkpoint, evaluate, train
from jaxvlm.manifest import FrozenSourceError

STEPS = {"train.num_steps": 2, "train.log_every": 1, "train.progress_bar": False}


@pytest.fixture(scope="module")
def tiny_vit_workdir(tiny_config, tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("tiny_vit")
    train.train(tiny_config("backbones_pretrain", STEPS, model="vit"), workdir, cache_dir=cache_dir)
    return workdir


def test_resuming_with_another_model_shape_names_the_keys(tiny_config, tmp_path, cache_dir):
    workdir = tmp_path / "run"
    train.train(tiny_config("backbones_pretrain", STEPS, model="lm"), workdir, cache_dir=cache_dir)
    wider = tiny_config(
        "backbones_pretrain", {**STEPS, "train.num_steps": 4, "llm.mlp_dim": 96}, model="lm"
    )
    config_before = (workdir / "config.json").read_text()
    with pytest.raises(ValueError, match=r"llm\.mlp_dim: checkpoint 64, current 96"):
        train.train(wider, workdir, cache_dir=cache_dir)
    assert (workdir / "config.json").read_text() == config_before  # nothing overwritten
    assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [2]


def test_frozen_source_is_loaded_and_a_changed_one_is_refused(
    tiny_config, tiny_vit_workdir, tmp_path, cache_dir, monkeypatch
):
    """Locked-image tuning from a pretrained ViT workdir: the manifest pins the source's hashes."""
    source = tmp_path / "vit_source"
    shutil.copytree(tiny_vit_workdir, source)
    monkeypatch.chdir(tmp_path)  # a relative source path is recorded as an absolute one
    overrides = {
        **STEPS,
        "encoder.checkpoint": "vit_source",
        "trainable": ("text_encoder/.*", "text_projection/.*"),
    }
    config = tiny_config("backbones_pretrain", overrides, model="vit")
    summary = train.train(config, tmp_path / "lit", cache_dir=cache_dir)
    pretrained = checkpoint.read_params(source)
    import numpy as np

    for name, value in checkpoint.flatten_params(summary["state"].params).items():
        if name.startswith("encoder/"):
            np.testing.assert_array_equal(np.asarray(value), pretrained[name])
    manifest = checkpoint.Checkpointer(tmp_path / "lit", read_only=True).read_manifest()
    assert manifest["sources"]["encoder"]["path"] == str(source)

    # Resuming with another source than the one trained from is refused.
    moved = tmp_path / "vit_source_copy"
    shutil.copytree(source, moved)
    other = tiny_config(
        "backbones_pretrain",
        {**overrides, "encoder.checkpoint": str(moved), "train.num_steps": 3},
        model="vit",
    )
    with pytest.raises(FrozenSourceError, match="trained from"):
        train.train(other, tmp_path / "lit", cache_dir=cache_dir)
    monkeypatch.chdir("/")
    # The source changes under the run: resuming it is refused, naming component and file.
    longer = tiny_config("backbones_pretrain", {**overrides, "train.num_steps": 3}, model="vit")
    victim = next(
        p
        for p in sorted((source / "checkpoints").rglob("*"))
        if p.is_file() and p.stat().st_size > 0
    )
    victim.write_bytes(victim.read_bytes() + b"tampered")
    with pytest.raises(FrozenSourceError, match="encoder"):
        train.train(longer, tmp_path / "lit", cache_dir=cache_dir)
    shutil.rmtree(source)
    with pytest.raises(FrozenSourceError, match="encoder"):
        train.train(longer, tmp_path / "lit", cache_dir=cache_dir)


def test_evaluate_cli_json_and_missing_step(tiny_vit_workdir, cache_dir, capsys):
    # A save still in flight (a run training there) must survive an evaluation.
    in_flight = tiny_vit_workdir / "checkpoints" / "9.orbax-checkpoint-tmp-1"
    (in_flight / "state").mkdir(parents=True)
    evaluate.main(
        [
            "--workdir",
            str(tiny_vit_workdir),
            "--cache-dir",
            str(cache_dir),
            "--config.evals.retrieval.batch_size",
            "24",
        ]
    )
    assert in_flight.is_dir()
    assert "r1_image_to_text\t" in capsys.readouterr().out
    shutil.rmtree(in_flight)
    evaluate.main(
        [
            "--workdir",
            str(tiny_vit_workdir),
            "--json",
            "--cache-dir",
            str(cache_dir),
            "--split",
            "test_novel",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 2 and result["split"] == "test_novel"
    assert set(result["metrics"]) >= {"r1_image_to_text", "r10_text_to_image"}
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(
            ["--workdir", str(tiny_vit_workdir), "--step", "7", "--cache-dir", str(cache_dir)]
        )
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert "step 7 not found" in error and "steps that exist: 2" in error
    assert "Traceback" not in error


@pytest.mark.parametrize("exists, message", [(False, "does not exist"), (True, "no checkpoints")])
def test_evaluate_without_checkpoint_is_one_clear_line(tmp_path, capsys, exists, message):
    workdir = tmp_path / "nothing"
    if exists:
        workdir.mkdir()
    with pytest.raises(SystemExit):
        evaluate.main(["--workdir", str(workdir)])
    error = capsys.readouterr().err.strip()
    assert error.startswith("jaxvlm.evaluate: error:") and message in error
    assert len(error.splitlines()) == 1

"""End-to-end training on tiny configs: what a user launching runs relies on."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import checkpoint, train

LM_OVERRIDES = {
    "train.num_steps": 6,
    "train.checkpoint_every": 3,
    "train.log_every": 1,
    "train.progress_bar": False,
}


@pytest.fixture(scope="module")
def lm_reference(tiny_config, tmp_path_factory, cache_dir):
    """An uninterrupted 6-step tiny LM run on the default mesh (all 8 devices on `data`)."""
    workdir = tmp_path_factory.mktemp("lm_reference")
    config = tiny_config("backbones_pretrain", LM_OVERRIDES, model="lm")
    return train.train(config, workdir, cache_dir=cache_dir), workdir


def test_lm_trains_and_writes_its_workdir(lm_reference):
    summary, workdir = lm_reference
    assert summary["step"] == 6
    losses = [summary["losses"][s] for s in range(1, 7)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    for name in ("config.json", "tokenizer.json", "preprocessing.json", "metrics.jsonl"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/learning_rate", "train/grad_norm"} <= set(rows[0])
    # Step 1's update used the schedule at 0 (no warm-up in the tiny config: the peak rate).
    assert rows[0]["train/learning_rate"] == pytest.approx(3e-3)
    assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [3, 6]
    assert "perplexity" in summary["evals"]["perplexity"]


def test_resumed_run_equals_uninterrupted_bitwise(
    lm_reference, tiny_config, tmp_path, cache_dir, monkeypatch
):
    reference, _ = lm_reference
    config = tiny_config("backbones_pretrain", LM_OVERRIDES, model="lm")
    original_record = train.TrainLoop.record

    def crash_at_step_5(self, step, metrics):
        if step == 5:
            raise KeyboardInterrupt("simulated preemption")
        return original_record(self, step, metrics)

    monkeypatch.setattr(train.TrainLoop, "record", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.train(config, tmp_path / "run", cache_dir=cache_dir)
    monkeypatch.setattr(train.TrainLoop, "record", original_record)
    assert checkpoint.Checkpointer(tmp_path / "run", read_only=True).all_steps() == [3]

    resumed = train.train(config, tmp_path / "run", cache_dir=cache_dir)
    assert sorted(resumed["losses"]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed["losses"][step] == reference["losses"][step], step
    chex.assert_trees_all_equal(resumed["state"].params, reference["state"].params)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [row["step"] for row in rows if "train/loss" in row]
    assert logged == [1, 2, 3, 4, 5, 6]  # steps re-run after the resume are logged once
    chex.assert_trees_all_equal(resumed["state"].opt_state, reference["state"].opt_state)


def test_sharded_steps_match_unsharded(tiny_config, tmp_path, cache_dir):
    """A 2×4 (data × fsdp) mesh against one device: same losses, params and optimizer state, up to
    the order of reductions (INTERFACES.md §5).

    Adam divides by sqrt(v) + eps: for rows of rarely seen tokens |g| ~ eps, which amplifies the
    reduction-order noise of g a thousandfold. A larger eps keeps this test about the sharded
    computation rather than Adam's conditioning.
    """
    steps = {
        "train.num_steps": 2,
        "train.log_every": 1,
        "train.progress_bar": False,
        "optimizer.eps": 1e-4,
    }
    single_config = tiny_config("backbones_pretrain", {**steps, "mesh.data": 1}, model="lm")
    single = train.train(
        single_config, tmp_path / "single", cache_dir=cache_dir, devices=jax.devices()[:1]
    )
    sharded_config = tiny_config(
        "backbones_pretrain", {**steps, "mesh.data": 2, "mesh.fsdp": 4}, model="lm"
    )
    sharded = train.train(sharded_config, tmp_path / "sharded", cache_dir=cache_dir)
    np.testing.assert_allclose(
        [sharded["losses"][s] for s in (1, 2)], [single["losses"][s] for s in (1, 2)], rtol=1e-5
    )
    for field in ("params", "opt_state"):
        chex.assert_trees_all_close(
            getattr(sharded["state"], field), getattr(single["state"], field), rtol=1e-5, atol=1e-6
        )


def test_frozen_tower_is_bit_identical_and_has_no_optimizer_state(tiny_config, tmp_path, cache_dir):
    """Locked-image tuning (LiT): the ViT frozen, the text tower and heads trained."""
    overrides = {
        "train.num_steps": 3,
        "train.log_every": 1,
        "train.progress_bar": False,
        "encoder.param_dtype": "bfloat16",  # a frozen tower may be stored in bf16
        "trainable": (
            "text_encoder/.*",
            "image_projection/.*",
            "text_projection/.*",
            "log_inverse_temperature",
        ),
    }
    config = tiny_config("backbones_pretrain", overrides, model="vit")
    from jaxvlm import initialization, models, sharding

    mesh = sharding.make_mesh(config.mesh)
    model = models.build_model(config)
    before = initialization.setup_state(config, model, mesh, tmp_path / "fresh", cache_dir)
    initial_encoder = jax.device_get(before.state.params["encoder"])
    summary = train.train(config, tmp_path / "lit", cache_dir=cache_dir)
    after = jax.device_get(summary["state"].params)
    chex.assert_trees_all_equal(after["encoder"], initial_encoder)
    assert not np.allclose(
        after["text_projection"]["kernel"],
        jax.device_get(before.state.params["text_projection"]["kernel"]),
    )
    # The optimizer holds moments for trainable leaves only.
    opt_leaves = jax.tree.leaves(summary["state"].opt_state)
    trainable = [
        x for k, x in checkpoint.flatten_params(after).items() if not k.startswith("encoder/")
    ]
    moment_elements = sum(x.size for x in opt_leaves if jnp.issubdtype(x.dtype, jnp.floating))
    assert moment_elements == 2 * sum(x.size for x in trainable)
    # The checkpoint holds the trainable parameters only.
    saved = checkpoint.read_params(tmp_path / "lit")
    assert saved and not any(name.startswith("encoder/") for name in saved)


def test_gradient_accumulation_matches_one_large_batch(tiny_config, tmp_path, cache_dir):
    base = {"train.num_steps": 2, "train.log_every": 1, "train.progress_bar": False}
    config = tiny_config("backbones_pretrain", base, model="lm")
    accumulated = tiny_config(
        "backbones_pretrain", {**base, "train.grad_accum_steps": 2}, model="lm"
    )
    one = train.train(config, tmp_path / "one", cache_dir=cache_dir)
    two = train.train(accumulated, tmp_path / "two", cache_dir=cache_dir)
    np.testing.assert_allclose(two["losses"][1], one["losses"][1], rtol=1e-5)
    # Summation order differs; Adam turns that noise in near-zero gradients (|g| ~ eps, e.g. the
    # embedding rows of absent tokens) into parameter differences of a few 1e-6 (lr 3e-3).
    chex.assert_trees_all_close(two["state"].params, one["state"].params, rtol=1e-4, atol=1e-5)


def test_dual_encoder_trains_and_reports_retrieval(tiny_config, tmp_path, cache_dir):
    overrides = {"train.num_steps": 3, "train.log_every": 1, "train.progress_bar": False}
    config = tiny_config("backbones_pretrain", overrides, model="vit")
    summary = train.train(config, tmp_path / "vit", cache_dir=cache_dir)
    metrics = summary["evals"]["retrieval"]
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert 0.0 <= metrics[f"r{k}_{direction}"] <= 100.0
        assert metrics[f"r1_{direction}"] <= metrics[f"r10_{direction}"]


def test_init_from_loads_a_previous_run(lm_reference, tiny_config, tmp_path, cache_dir):
    """Stage chaining: `config.init_from` starts from another run's parameters."""
    _, reference_workdir = lm_reference
    overrides = {**LM_OVERRIDES, "train.num_steps": 1, "init_from": str(reference_workdir)}
    config = tiny_config("backbones_pretrain", overrides, model="lm")
    from jaxvlm import initialization, models, sharding

    mesh = sharding.make_mesh(config.mesh)
    setup = initialization.setup_state(
        config, models.build_model(config), mesh, tmp_path / "stage2", cache_dir
    )
    loaded = checkpoint.flatten_params(jax.device_get(setup.state.params))
    saved = checkpoint.read_params(reference_workdir)
    assert loaded.keys() == saved.keys()
    for name in saved:
        np.testing.assert_array_equal(loaded[name], saved[name])
    assert int(setup.state.step) == 0  # a new run, not a resume


def test_full_state_checkpoints_resume(tiny_config, tmp_path, cache_dir):
    overrides = {
        **LM_OVERRIDES,
        "train.save_full_state": True,
        "train.num_steps": 3,
        "trainable": ("llm/layers.*",),
    }
    config = tiny_config("backbones_pretrain", overrides, model="lm")
    first = train.train(config, tmp_path / "full", cache_dir=cache_dir)
    saved = checkpoint.read_params(tmp_path / "full")
    assert "llm/embed_tokens/embedding" in saved  # frozen leaves saved too
    longer = tiny_config("backbones_pretrain", {**overrides, "train.num_steps": 4}, model="lm")
    resumed = train.train(longer, tmp_path / "full", cache_dir=cache_dir)
    assert sorted(resumed["losses"]) == [4]
    chex.assert_trees_all_equal(
        resumed["state"].params["llm"]["embed_tokens"], first["state"].params["llm"]["embed_tokens"]
    )

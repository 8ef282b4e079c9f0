"""Checkpoints: round trips across meshes, trainable-only saves, errors, crash safety, manifests."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxvlm import checkpoint, manifest
from jaxvlm.checkpoint import Checkpointer
from jaxvlm.sharding import make_mesh

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"llm": {"dim": 16, "depth": 2}, "encoder": {"width": 8}, "mesh": [2, 2, 1]}
DATA_ITER = {"next_index": 5, "worker": {"seed": 3}}


def mesh_of(num_devices: int):
    shapes = {1: (1, 1), 4: (2, 2), 8: (2, 4)}
    data, fsdp = shapes[num_devices]
    return make_mesh({"data": data, "fsdp": fsdp, "tensor": 1}, jax.devices()[:num_devices])


def sharding_for(shape, mesh) -> NamedSharding:
    """Leading dimension over fsdp (when it divides), second over data: really sharded."""
    spec = [None] * len(shape)
    if shape and shape[0] % mesh.shape["fsdp"] == 0:
        spec[0] = "fsdp"
    if len(shape) > 1 and shape[1] % mesh.shape["data"] == 0:
        spec[1] = "data"
    return NamedSharding(mesh, PartitionSpec(*spec))


def make_params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "encoder": {"kernel": jax.random.normal(keys[0], (8, 4))},
        "bridge": {
            "dense": {"kernel": jax.random.normal(keys[1], (8, 16)), "bias": jnp.arange(16.0)}
        },
    }


MASK = {"encoder": {"kernel": False}, "bridge": {"dense": {"kernel": True, "bias": True}}}


def make_state(mesh):
    """A trainable-only train state as jaxvlm saves it: flat trainable params, optax state whose
    frozen leaves are MaskedNodes, a step counter and a typed PRNG key."""
    params = make_params()
    labels = jax.tree.map(lambda trainable: "train" if trainable else "frozen", MASK)
    optimizer = optax.multi_transform(
        {"train": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, labels
    )
    opt_state = optimizer.init(params)
    opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, opt_state)
    trainable, _ = checkpoint.split_params(params, MASK)
    state = {
        "step": jnp.int32(7),
        "params": trainable,
        "opt_state": opt_state,
        "rng": jax.random.key(42),
    }
    return place(state, mesh)


def place(state, mesh):
    return jax.tree.map(lambda x: jax.device_put(x, sharding_for(x.shape, mesh)), state)


def abstract_of(state, mesh):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(x.shape, mesh)),
        state,
    )


def on_host(tree):
    """numpy copies (typed keys as their key data), for bitwise comparison across meshes."""

    def convert(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(convert, tree)


def save(checkpointer, step, state, **overrides):
    items = {"data_iter": DATA_ITER, "config": CONFIG, "manifest": {}} | overrides
    return checkpointer.save(step, state=state, **items)


@pytest.fixture(scope="module")
def saved_on_four_devices(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("four_devices")
    state = make_state(mesh_of(4))
    with Checkpointer(workdir) as checkpointer:
        save(checkpointer, 3, state)
    return workdir, state


def test_round_trip_keeps_values_shardings_and_json_items(saved_on_four_devices):
    workdir, state = saved_on_four_devices
    mesh = mesh_of(4)
    with Checkpointer(workdir, read_only=True) as checkpointer:
        restored = checkpointer.restore(None, abstract_state=abstract_of(state, mesh))
        assert checkpointer.read_config() == CONFIG
        assert checkpointer.read_manifest(3) == {}
    assert restored.step == 3
    assert (restored.data_iter, restored.config, restored.manifest) == (DATA_ITER, CONFIG, {})
    chex.assert_trees_all_equal(on_host(restored.state), on_host(state))
    assert type(restored.state["opt_state"]) is type(state["opt_state"])
    kernel = restored.state["params"]["bridge/dense/kernel"]
    assert kernel.sharding == sharding_for((8, 16), mesh)
    assert jax.dtypes.issubdtype(restored.state["rng"].dtype, jax.dtypes.prng_key)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_restore_on_another_device_count(saved_on_four_devices, num_devices):
    workdir, state = saved_on_four_devices
    mesh = mesh_of(num_devices)
    with Checkpointer(workdir, read_only=True) as checkpointer:
        restored = checkpointer.restore(3, abstract_state=abstract_of(state, mesh))
    chex.assert_trees_all_equal(on_host(restored.state), on_host(state))
    for leaf in jax.tree.leaves(restored.state):
        assert leaf.sharding == sharding_for(leaf.shape, mesh)
        assert len(leaf.sharding.device_set) == num_devices


def test_trainable_only_split_and_merge_round_trip(tmp_path):
    params = make_params()
    trainable, frozen = checkpoint.split_params(params, MASK)
    assert sorted(trainable) == ["bridge/dense/bias", "bridge/dense/kernel"]
    assert sorted(frozen) == ["encoder/kernel"]
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        save(checkpointer, 1, {"params": trainable})
        abstract_params = jax.eval_shape(make_params)
        abstract_trainable, _ = checkpoint.split_params(abstract_params, MASK)
        restored = checkpointer.restore(1, abstract_state={"params": abstract_trainable})
    chex.assert_trees_all_equal(checkpoint.merge_params(restored.state["params"], frozen), params)
    with pytest.raises(ValueError, match="without a mask entry: encoder/kernel"):
        checkpoint.split_params(params, {"bridge": MASK["bridge"]})
    with pytest.raises(ValueError, match="both trainable and frozen: encoder/kernel"):
        checkpoint.merge_params(frozen, frozen)


def test_missing_step_lists_the_steps_that_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        Checkpointer(tmp_path / "absent", read_only=True)
    state = {"x": jnp.ones(2)}
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(FileNotFoundError, match="holds no finished step"):
            checkpointer.restore(None, abstract_state=state)
        for step in (2, 4):
            save(checkpointer, step, state)
        with pytest.raises(FileNotFoundError, match=r"step 7 not found .*steps that exist: 2, 4$"):
            checkpointer.restore(7, abstract_state=state)
        with pytest.raises(FileNotFoundError, match="steps that exist: 2, 4"):
            checkpointer.read_config(7)


def test_check_compatible_names_every_differing_key():
    current = {"llm": {"dim": 32, "depth": 2}, "encoder": {"width": 4}, "mesh": (2, 2, 1)}
    checkpoint.check_compatible(CONFIG, CONFIG | {"mesh": (2, 2, 1)}, ["llm.dim", "mesh"])
    with pytest.raises(ValueError) as error:
        checkpoint.check_compatible(
            CONFIG, current, ["llm.dim", "llm.depth", "encoder.width", "bridge.num_queries"]
        )
    message = str(error.value)
    assert "llm.dim: checkpoint 16, current 32" in message
    assert "encoder.width: checkpoint 8, current 4" in message
    assert "llm.depth" not in message and "bridge.num_queries" not in message
    with pytest.raises(ValueError, match="llm.heads: checkpoint <missing>, current 4"):
        checkpoint.check_compatible(CONFIG, {"llm": {"heads": 4}}, ["llm.heads"])


def test_array_shape_mismatch_names_the_leaves(tmp_path):
    state = {"params": {"bridge/w": jnp.ones((8, 16)), "bridge/b": jnp.ones(16)}}
    with Checkpointer(tmp_path) as checkpointer:
        save(checkpointer, 1, state)
        wrong = {
            "params": {
                "bridge/w": jax.ShapeDtypeStruct((8, 32), jnp.float32),
                "bridge/b": jax.ShapeDtypeStruct((16,), jnp.float32),
                "bridge/extra": jax.ShapeDtypeStruct((2,), jnp.float32),
            }
        }
        with pytest.raises(ValueError) as error:
            checkpointer.restore(1, abstract_state=wrong)
    message = str(error.value)
    assert "params/bridge/w: checkpoint (8, 16), current (8, 32)" in message
    assert "only in the current state: params/bridge/extra" in message
    assert "bridge/b" not in message


def test_crash_in_save_keeps_previous_step_and_next_save_works(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import async_path

    state = {"x": jnp.arange(4.0)}
    checkpointer = Checkpointer(tmp_path)
    save(checkpointer, 1, state)
    checkpointer.wait_until_finished()

    async def crash_before_commit(*args, **kwargs):
        raise RuntimeError("simulated crash while finalising")

    # Everything is written; only the final rename that publishes the step fails.
    monkeypatch.setattr(async_path, "rename", crash_before_commit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save(checkpointer, 2, {"x": state["x"] + 1})
        checkpointer.wait_until_finished()
    monkeypatch.undo()
    assert checkpointer.all_steps() == [1] and checkpointer.latest_step() == 1
    assert any("tmp" in entry.name for entry in (tmp_path / "checkpoints").iterdir())
    restored = checkpointer.restore(None, abstract_state=state)
    chex.assert_trees_all_equal(restored.state, state)
    assert save(checkpointer, 2, {"x": state["x"] + 1})
    checkpointer.close()
    with Checkpointer(tmp_path) as reopened:
        assert reopened.all_steps() == [1, 2]
        chex.assert_trees_all_equal(
            reopened.restore(2, abstract_state=state).state["x"], state["x"] + 1
        )


def test_killed_process_mid_save_leaves_previous_step_restorable(tmp_path):
    """A real crash: the saving process dies (os._exit) after writing step 2, before publishing."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(REPOSITORY_ROOT)!r})
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import async_path
        from jaxvlm.checkpoint import Checkpointer
        checkpointer = Checkpointer({str(tmp_path)!r})
        items = dict(data_iter={{}}, config={{}}, manifest={{}})
        checkpointer.save(1, state={{"x": jnp.arange(4.0)}}, **items)
        checkpointer.wait_until_finished()
        async def die(*args, **kwargs):
            os._exit(17)
        async_path.rename = die
        checkpointer.save(2, state={{"x": jnp.zeros(4)}}, **items)
        checkpointer.wait_until_finished()
        """
    )
    environment = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True)
    assert result.returncode == 17, result.stderr.decode()[-2000:]
    directory = tmp_path / "checkpoints"
    assert sorted(entry.name for entry in directory.iterdir()) == ["1", "2.orbax-checkpoint-tmp"]
    state = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.all_steps() == [1]
        chex.assert_trees_all_equal(
            checkpointer.restore(None, abstract_state=state).state["x"], jnp.arange(4.0)
        )
        assert save(checkpointer, 2, {"x": jnp.ones(4)})
    assert sorted(entry.name for entry in directory.iterdir()) == ["1", "2"]


def test_max_to_keep_is_honoured(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as checkpointer:
        for step in range(1, 5):
            save(checkpointer, step, {"x": jnp.full(2, step)})
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [3, 4]


def test_async_save_wait_existing_step_and_close(tmp_path):
    state = {"x": jnp.arange(3.0)}
    with Checkpointer(tmp_path, async_save=True) as checkpointer:
        assert save(checkpointer, 5, state)
        checkpointer.wait_until_finished()
        assert checkpointer.latest_step() == 5
        # An existing step is skipped, and `force=True` replaces it.
        assert not save(checkpointer, 5, {"x": state["x"] * 0}, config={"changed": True})
        assert save(checkpointer, 6, state, data_iter=b'{"grain": "bytes state"}')
        assert save(checkpointer, 6, state, data_iter="a string state", force=True)
    # Leaving the context finalised the last async save.
    with Checkpointer(tmp_path, read_only=True) as checkpointer:
        assert checkpointer.all_steps() == [5, 6]
        assert checkpointer.read_config(5) == CONFIG
        assert checkpointer.read_data_iter(6) == "a string state"
        chex.assert_trees_all_equal(checkpointer.restore(5, abstract_state=state).state, state)


def test_bytes_data_iter_round_trips_and_non_json_fails_before_writing(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        save(checkpointer, 1, {"x": jnp.ones(1)}, data_iter=b"\x00grain\xff")
        assert checkpointer.read_data_iter() == b"\x00grain\xff"
        with pytest.raises(TypeError, match="'data_iter' is not JSON-serialisable"):
            save(checkpointer, 2, {"x": jnp.ones(1)}, data_iter={"bad": object()})
        assert sorted(entry.name for entry in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_checkpoint_holds_no_pickle_and_json_items(saved_on_four_devices):
    workdir, _ = saved_on_four_devices
    step_directory = workdir / "checkpoints" / "3"
    names = [path.name for path in step_directory.rglob("*") if path.is_file()]
    assert names and not [name for name in names if name.endswith((".pkl", ".pickle", ".npy"))]
    stored = {}
    for item in ("config", "data_iter", "manifest"):
        (file,) = [path for path in (step_directory / item).iterdir() if path.suffix != ".txt"]
        stored[item] = json.loads(file.read_text())
    assert stored["config"] == CONFIG and stored["manifest"] == {}
    assert stored["data_iter"] == {"kind": "dict", "value": DATA_ITER}


def make_sources(root: Path):
    huggingface = root / "hf_model"
    (huggingface / ".cache").mkdir(parents=True)
    (huggingface / "config.json").write_text('{"model_type": "llama"}')
    (huggingface / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (huggingface / ".cache" / "lock").write_text("volatile")
    gguf = root / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    run = root / "stage1"
    (run / "checkpoints" / "3" / "state").mkdir(parents=True)
    (run / "checkpoints" / "3" / "state" / "data").write_bytes(b"weights")
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    return huggingface, gguf, run


def test_manifest_detects_changed_and_missing_files(tmp_path):
    huggingface, gguf, run = make_sources(tmp_path / "sources")
    cache = tmp_path / "cache" / "hashes.json"
    sources = {
        name: manifest.source_entry(path, hash_cache_path=cache)
        for name, path in (("llm", huggingface), ("tokenizer", gguf), ("bridge", run))
    }
    assert sources["llm"]["kind"] == "hf" and sorted(sources["llm"]["files"]) == [
        "config.json",
        "model.safetensors",
    ]
    assert sources["tokenizer"] == {
        "path": str(gguf),
        "kind": "gguf",
        "files": {"model.gguf": manifest.sha256_file(gguf)},
    }
    assert sorted(sources["bridge"]["files"]) == ["checkpoints/3/state/data", "config.json"]
    recorded = manifest.make_manifest(sources)
    assert recorded["format_version"] == 1 and json.loads(json.dumps(recorded)) == recorded
    manifest.verify_manifest(recorded, hash_cache_path=cache)
    manifest.verify_manifest(recorded, full=True, hash_cache_path=cache)
    # The cache lives where it was told to; nothing is written beside the sources.
    assert cache.is_file() and sorted(p.name for p in cache.parent.iterdir()) == ["hashes.json"]
    assert sorted(p.name for p in huggingface.iterdir()) == [
        ".cache",
        "config.json",
        "model.safetensors",
    ]

    # Same size, old mtime restored: only the full re-hash (--verify) can tell.
    weights = huggingface / "model.safetensors"
    status = weights.stat()
    weights.write_bytes(bytes(reversed(range(256))) * 4)
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns))
    manifest.verify_manifest(recorded, hash_cache_path=cache)
    with pytest.raises(manifest.FrozenSourceError, match="'llm' .*model.safetensors changed"):
        manifest.verify_manifest(recorded, full=True, hash_cache_path=cache)

    # A changed mtime invalidates the cache entry, so the cached check sees the change too.
    gguf.write_bytes(b"GGUF" + bytes(99) + b"\x01")
    with pytest.raises(manifest.FrozenSourceError) as error:
        manifest.verify_manifest(recorded, hash_cache_path=tmp_path / "cache" / "hashes.json")
    assert "'tokenizer' (gguf" in str(error.value) and "model.gguf changed" in str(error.value)
    assert "\n" not in str(error.value)

    (run / "checkpoints" / "3" / "state" / "data").unlink()
    with pytest.raises(ValueError, match="'bridge' .*checkpoints/3/state/data is missing"):
        manifest.verify_manifest(
            {"format_version": 1, "sources": {"bridge": sources["bridge"]}}, hash_cache_path=cache
        )
    with pytest.raises(manifest.FrozenSourceError, match="'tokenizer' .* is missing"):
        gguf.unlink()
        manifest.verify_manifest(
            {"format_version": 1, "sources": {"tokenizer": sources["tokenizer"]}},
            hash_cache_path=cache,
        )

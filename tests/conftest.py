"""Test setup shared by every test: 8 CPU devices, set before jax is imported (STYLE.md §11)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain worker processes read absl flags (RECIPES.md).
flags.FLAGS.mark_as_parsed()

from helpers import CONFIGS, QUICKSTART_OVERRIDES  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One jaxvlm cache (worlds, backbones, compiled programs) for the whole session."""
    path = tmp_path_factory.mktemp("jaxvlm_cache")
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path / "compilation"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


@pytest.fixture(scope="session")
def tiny_config():
    """`tiny_config("backbones_pretrain", model="lm")` loads configs/<recipe>.py with size=tiny."""
    from jaxvlm import config_utils

    def load(recipe: str, overrides: dict | None = None, **args):
        arg = ",".join(["size=tiny", *(f"{k}={v}" for k, v in args.items())])
        return config_utils.load_config(f"{CONFIGS / recipe}.py:{arg}", overrides)

    return load


@pytest.fixture(scope="session")
def mesh_2x4():
    from jaxvlm import sharding

    return sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})


@pytest.fixture(scope="session")
def quickstart_workdir(tmp_path_factory, cache_dir):
    """A finished shrunk `python -m jaxvlm.quickstart` workdir (slow: ~1 min), shared by the
    quickstart, CLI and notebook tests."""
    from pathlib import Path

    from jaxvlm import quickstart

    workdir = Path(tmp_path_factory.mktemp("quickstart"))
    quickstart.run(
        workdir, cache_dir, CONFIGS, size="tiny", overrides={"llava": QUICKSTART_OVERRIDES}
    )
    return workdir

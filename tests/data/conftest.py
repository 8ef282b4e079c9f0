"""A small world shared by the data tests, built once per session."""

import pytest

from jaxvlm.data.storage import load_world, write_world
from jaxvlm.data.tokenizer import world_tokenizer
from jaxvlm.data.world_config import WorldConfig

SMALL_WORLD = WorldConfig(
    seed=3, num_scenes=200, num_eval_scenes=40, num_clips=20, num_eval_clips=8, num_shots=3
)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    path = tmp_path_factory.mktemp("worlds") / "small"
    write_world(SMALL_WORLD, path)
    return load_world(path)


@pytest.fixture(scope="session")
def tokenizer():
    return world_tokenizer()

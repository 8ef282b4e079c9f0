"""Building worlds into (and loading them from) directories, cached by config hash.

`build_world(config, cache_dir)` puts a world at `<cache_dir>/worlds/<config fingerprint>/` and
reuses it when already complete. A world is generated in a temporary sibling directory and renamed
into place in one step, so an interrupted build leaves no half-built world behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import tensorflow_datasets as tfds

from jaxvlm.data.builder import JaxvlmWorld
from jaxvlm.data.world_config import CLIP_SPLITS, WorldConfig

WORLD_FILE = "world.json"
_KINDS = ("scenes", "clips")


class World:
    """A built world: its config, held-out compositions, split sizes and data sources.

    Attributes:
      path: the world directory.
      config: the `WorldConfig` it was built from.
      held_out: held-out "colour shape" compositions.
      splits: {split name: number of records}.
    """

    def __init__(self, path: str | os.PathLike):
        metadata_path = os.path.join(path, WORLD_FILE)
        if not os.path.exists(metadata_path):
            raise ValueError(f"{path} is not a world directory (no {WORLD_FILE})")
        with open(metadata_path) as file:
            metadata = json.load(file)
        self.path = os.path.abspath(path)
        self.config = WorldConfig.from_dict(metadata["config"])
        self.held_out: tuple[str, ...] = self.config.held_out
        self.splits: dict[str, int] = metadata["splits"]
        self._builders: dict[str, tfds.core.DatasetBuilder] = {}

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def builder(self, split: str) -> tfds.core.DatasetBuilder:
        """The read-only tfds builder holding `split`."""
        if split not in self.splits:
            raise ValueError(
                f"world {self.path} has no split {split!r}; splits: {list(self.splits)}"
            )
        kind = "clips" if split in CLIP_SPLITS else "scenes"
        if kind not in self._builders:
            self._builders[kind] = tfds.builder_from_directory(os.path.join(self.path, kind))
        return self._builders[kind]

    def as_data_source(self, split: str):
        """Random-access records of `split` (a tfds ArrayRecordDataSource; no TensorFlow)."""
        return self.builder(split).as_data_source(split)

    def __repr__(self) -> str:
        return f"World({self.path!r}, splits={self.splits}, held_out={list(self.held_out)})"


def load_world(path: str | os.PathLike) -> World:
    """Opens a world directory written by `build_world` or `write_world`."""
    return World(path)


def is_complete(path: str | os.PathLike) -> bool:
    return os.path.exists(os.path.join(path, WORLD_FILE))


def write_world(config: WorldConfig, path: str | os.PathLike) -> World:
    """Builds `config` into `path` (which must not hold anything else) unless already there.

    Raises:
      ValueError: when `path` is a non-empty directory that is not this world.
    """
    path = os.path.abspath(path)
    if is_complete(path):
        world = World(path)
        if world.config != config:
            raise ValueError(f"{path} already holds another world ({world.config})")
        return world
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{path} exists and is not an empty directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    start = time.perf_counter()
    staging = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
    try:
        staged = _generate(config, staging)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        try:
            os.rename(staged, path)  # atomic: readers see nothing or a complete world
        except OSError:
            if not is_complete(path):  # not a concurrent build of the same world
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logging.info("built world %s in %.1f s", path, time.perf_counter() - start)
    return World(path)


def _generate(config: WorldConfig, staging: str) -> str:
    """Writes both tfds datasets and world.json under `staging`; returns the world directory."""
    tfds.disable_progress_bar()
    world_dir = os.path.join(staging, "world")
    os.makedirs(world_dir)
    download_config = tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP, try_download_gcs=False
    )
    for kind in _KINDS:
        builder = JaxvlmWorld(
            world_config=config,
            config=kind,
            data_dir=os.path.join(staging, "tfds"),
            file_format="array_record",
        )
        builder.download_and_prepare(download_config=download_config)
        os.rename(builder.data_dir, os.path.join(world_dir, kind))
    metadata = {"config": config.to_dict(), "splits": config.split_sizes()}
    with open(os.path.join(world_dir, WORLD_FILE), "w") as file:
        json.dump(metadata, file, indent=2)
    return world_dir


def build_world(config: WorldConfig, cache_dir: str | os.PathLike) -> str:
    """The path of `config`'s world under `<cache_dir>/worlds/`, built on first use."""
    path = os.path.join(os.path.abspath(cache_dir), "worlds", config.fingerprint())
    write_world(config, path)
    return path


def open_world(config: WorldConfig | Mapping[str, Any], cache_dir: str | os.PathLike) -> World:
    """`load_world(build_world(...))` for a `WorldConfig` or its fields (e.g. config.data.world)."""
    if not isinstance(config, WorldConfig):
        config = WorldConfig.from_dict(dict(config))
    return load_world(build_world(config, cache_dir))

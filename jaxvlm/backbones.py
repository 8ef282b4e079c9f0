"""Self-pretrained backbones, cached by config hash and built only when a job needs them.

`ensure_backbone("configs/backbones_pretrain.py:model=vit", cache_dir)` returns the workdir of that
training job under `<cache>/backbones/<config-hash>/`, training it first if no finished copy exists. A run
interrupted mid-way resumes from its own checkpoints (it trains in `<hash>.partial/` and is renamed when
finished, so a half-trained backbone is never mistaken for a finished one).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax

from jaxvlm import cache, config_utils

logger = logging.getLogger(__name__)

FINISHED_MARKER = "FINISHED.json"


def backbone_workdir(config, cache_dir: Path) -> Path:
    return cache.backbones_dir(cache_dir) / config_utils.config_hash(config)


def ensure_backbone(
    config_spec: str, cache_dir: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[Path, dict]:
    """(workdir of the finished backbone, its training summary `{"evals": ..., "wall_s": ...}`)."""
    from jaxvlm import train

    cache_dir = cache.resolve(cache_dir)
    config = config_utils.load_config(config_spec, overrides)
    final = backbone_workdir(config, cache_dir)
    marker = final / FINISHED_MARKER
    if marker.is_file():
        logger.info("reusing backbone %s from %s", config_spec, final)
        return final, json.loads(marker.read_text())
    partial = final.with_name(final.name + ".partial")
    logger.info("pretraining backbone %s in %s", config_spec, partial)
    summary = train.train(config, partial, cache_dir=cache_dir)
    record = {"config": config_spec, "step": summary["step"], "evals": summary["evals"]}
    if jax.process_count() > 1:  # every process has closed its checkpointer before the rename
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("backbone trained")
    if jax.process_index() == 0:
        (partial / FINISHED_MARKER).write_text(json.dumps(record, indent=2))
        partial.rename(final)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("backbone renamed")
    return final, record


BACKBONE_SCHEME = "backbone:"


def resolve_sources(config, cache_dir: str | Path) -> None:
    """Replaces each component `checkpoint="backbone:<config spec>"` by the workdir of that
    pretrained backbone, training it first when the cache has none (the synthetic world's towers).

    Runs before the config is saved, so a run's config names the workdir it really read.
    """
    from jaxvlm.config_utils import MODEL_COMPONENTS

    for component in MODEL_COMPONENTS:
        if component not in config or "checkpoint" not in config[component]:
            continue
        source = config[component].checkpoint
        if source.startswith(BACKBONE_SCHEME):
            workdir, _ = ensure_backbone(source[len(BACKBONE_SCHEME) :], cache_dir)
            with config.unlocked():
                config[component].checkpoint = str(workdir)

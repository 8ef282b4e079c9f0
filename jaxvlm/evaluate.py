"""Scores a trained model: `python -m jaxvlm.evaluate --workdir DIR [--step N] [--split test] [--json]`.

The model's config (hence its evaluators), tokenizer and preprocessing come from what was saved with it.
Evaluation fields can be overridden (`--config.evals.retrieval.batch_size=64`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
from pathlib import Path

from jaxvlm import cli, config_utils

logger = logging.getLogger(__name__)


def load_run_config(workdir: Path, step: int | None = None):
    """The locked ConfigDict a checkpoint was trained with."""
    import ml_collections

    from jaxvlm import checkpoint

    with checkpoint.Checkpointer(workdir, read_only=True) as checkpointer:
        step = checkpointer._resolve_step(step)
        saved = checkpointer.read_config(step)
    config = ml_collections.ConfigDict(_tuples(saved))
    config.lock()
    return config, step


def _tuples(value):
    """JSON lists back to tuples (configs hold tuples)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def evaluate_workdir(
    workdir: str | Path,
    *,
    split: str,
    cache_dir: str | Path,
    step: int | None = None,
    overrides: dict | None = None,
) -> dict:
    """`{"checkpoint", "step", "split", "metrics": {...}}` for the run in `workdir`."""
    from jaxvlm import cache, evals, initialization, models, sharding
    from jaxvlm import data as data_lib

    workdir = Path(workdir).absolute()
    config, step = load_run_config(workdir, step)
    for key, text in (overrides or {}).items():
        config_utils.set_by_path(config, key, config_utils.parse_override_value(config, key, text))
    config_utils.validate_evals(config)
    if not config.evals:
        raise ValueError(f"the config saved in {workdir} names no evaluators (config.evals)")
    with config.unlocked():
        for fields in config.evals.values():
            fields.split = split
    cache_dir = cache.resolve(cache_dir)
    # Evaluation batches are padded to the mesh, so any device count works (no training batch).
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    data = types.SimpleNamespace(
        world=data_lib.open_world(config.data.world, cache_dir),
        tokenizer=data_lib.Tokenizer.from_file(str(workdir / "tokenizer.json")),
        preprocessing=data_lib.ImagePreprocessing.load(str(workdir / "preprocessing.json")),
    )
    model = models.build_model(config)
    setup = initialization.setup_state(
        config, model, mesh, workdir, cache_dir, step=step, read_only=True
    )
    evaluators = evals.setup_evals(config, model, mesh, data)
    results = evals.run_evals(evaluators, setup.state.params, step, _NullWriter(), force=True)
    metrics = {k: v for name_metrics in results.values() for k, v in name_metrics.items()}
    return {
        "checkpoint": str(workdir / "checkpoints" / str(step)),
        "step": step,
        "split": split,
        "metrics": metrics,
    }


class _NullWriter:
    def write(self, step, scalars) -> None: ...


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxvlm.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True, help="a jaxvlm run directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--split", default="test", choices=("test", "test_novel", "validation"))
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--cache-dir", default=None)
    args, rest = parser.parse_known_args(argv)
    cli.setup_logging()
    with cli.user_errors("jaxvlm.evaluate"):
        cache_dir = cli.cache_dir_from(args.cache_dir)
        cli.start_runtime(cache_dir)
        overrides = config_utils.split_override_args(rest)
        if any(not key.startswith("evals.") for key in overrides):
            raise ValueError("evaluate accepts only evaluation overrides (--config.evals.*)")
        result = evaluate_workdir(
            args.workdir, split=args.split, cache_dir=cache_dir, step=args.step, overrides=overrides
        )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result["metrics"].items():
            print(f"{key}\t{value:.4f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

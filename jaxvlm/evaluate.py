"""Scores a trained model: `python -m jaxvlm.evaluate --workdir DIR [--step N] [--split test] [--json]`,
or a foreign one converted on load: `--checkpoint HF_DIR_OR_GGUF` (see `jaxvlm.convert`).

The model's config (hence its evaluators), tokenizer and preprocessing come from what was saved with
it. Generative evaluators (VQA accuracy, CIDEr) run beside the blind baseline: the frozen LLM the
bridge started from, with the same template, prompt and decoding and no image (INTERFACES.md §3).
`--data WORLD_DIR` scores a world built elsewhere (e.g. another seed, `python -m jaxvlm.data.world`);
`--verify` re-hashes every frozen source in full. Evaluation fields can be overridden
(`--config.evals.vqa.num_examples=100`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from jaxvlm import cli, config_utils

logger = logging.getLogger(__name__)


def load_run_config(workdir: Path, step: int | None = None):
    """The locked ConfigDict a checkpoint was trained with, and the resolved step."""
    import ml_collections

    from jaxvlm import checkpoint

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"--workdir {workdir} does not exist")
    with checkpoint.Checkpointer(workdir, read_only=True) as checkpointer:
        step = checkpointer._resolve_step(step)
        saved = checkpointer.read_config(step)
    config = ml_collections.ConfigDict(upgrade_saved_config(_tuples(saved)))
    config.lock()
    return config, step


# Fields added to base_config after runs were already saved, with the value that reproduces how
# those runs behaved: a checkpoint saved before a field existed still loads and evaluates.
_ADDED_FIELDS = {
    ("data", "caption_prompts"): (),
    ("data", "augment"): "none",
    ("data", "bridge_max_text_len"): 32,
    ("data", "image_position"): "random",
    ("data", "prefix_split"): "none",
    ("data", "decoder_max_len"): 32,
    ("loss",): dict(itc=1.0, itm=1.0, itg=1.0, itc_label_smoothing=0.1, itg_label_smoothing=0.1),
}
_ADDED_GENERATIVE_EVAL_FIELDS = {"num_beams": 1, "length_penalty": 1.0}
_ADDED_RETRIEVAL_EVAL_FIELDS = {"rerank": "none", "rerank_k": 128}


def upgrade_saved_config(saved: dict) -> dict:
    """A saved config dict with the fields added since it was written (`_ADDED_FIELDS`)."""
    for path, value in _ADDED_FIELDS.items():
        parent = saved
        for key in path[:-1]:
            parent = parent.setdefault(key, {})
        parent.setdefault(path[-1], value)
    bridge = saved.get("bridge", {})
    if bridge.get("name") == "qformer":  # its text side got its own tokenizer field
        bridge.setdefault("tokenizer", "world")
    for fields in saved.get("evals", {}).values():
        if fields.get("type") in ("vqa", "captioning"):
            for key, value in _ADDED_GENERATIVE_EVAL_FIELDS.items():
                fields.setdefault(key, value)
        if fields.get("type") == "retrieval":
            for key, value in _ADDED_RETRIEVAL_EVAL_FIELDS.items():
                fields.setdefault(key, value)
    return saved


def _tuples(value):
    """JSON lists back to tuples (configs hold tuples)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


@dataclasses.dataclass
class LoadedRun:
    """A saved model ready to run: config, step, module, parameters and what travels with it."""

    workdir: Path
    config: Any
    step: int
    model: Any
    params: Any
    tokenizer: Any
    preprocessing: Any
    mesh: Any


def load_run(
    workdir: str | Path,
    *,
    cache_dir: str | Path,
    step: int | None = None,
    overrides: dict | None = None,
    verify: bool = False,
) -> LoadedRun:
    """Restores `workdir`'s checkpoint `step` (default latest) read-only on all local devices.

    `overrides` ({"evals.vqa.num_examples": "100"}) change evaluation fields only; `verify`
    re-hashes every frozen source in full before loading.
    """
    from jaxvlm import cache, checkpoint, initialization, manifest, models, sharding
    from jaxvlm import data as data_lib

    workdir = Path(workdir).absolute()
    config, step = load_run_config(workdir, step)
    override_evals(config, overrides)
    cache_dir = cache.resolve(cache_dir)
    if verify:
        with checkpoint.Checkpointer(workdir, read_only=True) as checkpointer:
            saved_manifest = checkpointer.read_manifest(step)
        manifest.verify_manifest(
            saved_manifest, full=True, hash_cache_path=cache.hash_cache_path(cache_dir)
        )
    # Evaluation batches are padded to the mesh, so any device count works (no training batch).
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    model = models.build_model(config)
    setup = initialization.setup_state(
        config, model, mesh, workdir, cache_dir, step=step, read_only=True
    )
    return LoadedRun(
        workdir=workdir,
        config=config,
        step=step,
        model=model,
        params=setup.state.params,
        tokenizer=data_lib.Tokenizer.from_directory(str(workdir)),
        preprocessing=data_lib.ImagePreprocessing.load(str(workdir / "preprocessing.json")),
        mesh=mesh,
    )


def override_evals(config, overrides: dict | None) -> None:
    """Applies `{"evals.vqa.num_examples": "100"}`-style overrides (evaluation fields only)."""
    for key, text in (overrides or {}).items():
        if not key.startswith("evals."):
            raise ValueError(
                f"only evaluation fields can be overridden (config.evals.*), not {key}"
            )
        config_utils.set_by_path(config, key, config_utils.parse_override_value(config, key, text))
    config_utils.validate_evals(config)


def blind_params(config, params):
    """`params` with the LLM replaced by the frozen source it was trained from (`config.llm
    .checkpoint`; the run's own LLM when it has no source), for the blind baseline."""
    import jax

    from jaxvlm import checkpoint, importers

    source = config.llm.checkpoint
    if not source:
        logger.warning("config.llm.checkpoint is empty: the blind baseline uses the run's own LLM")
        return params
    flat = checkpoint.flatten_params(params)
    if checkpoint.detect_source_kind(source) == "jaxvlm":
        loaded = {k: v for k, v in checkpoint.read_params(source).items() if k.startswith("llm/")}
    elif importers.vlm_importer(source) is not None:  # a finished LLaVA: its own LLM
        whole = importers.vlm_importer(source).load_params(source, config, flat)
        loaded = {k: v for k, v in whole.items() if k.startswith("llm/")}
    else:  # an HF directory or a .gguf file: its tensors, imported as in training
        loaded = importers.load_component("llm", source, config.llm, flat)
    # Rows the model adds beyond the source (an `<image>` embedding) keep the run's values.
    fresh = tuple(f"/{name}" for name in importers.FRESH_PARAMETERS)
    missing = sorted(
        k for k in flat if k.startswith("llm/") and k not in loaded and not k.endswith(fresh)
    )
    if missing:
        raise ValueError(f"the LLM source {source} lacks parameters {missing[:5]}")
    for key, value in loaded.items():
        flat[key] = jax.device_put(value.astype(flat[key].dtype), flat[key].sharding)
    return checkpoint.unflatten_params(flat)


def evaluate_run(
    run: LoadedRun,
    *,
    split: str,
    world_dir: str | Path | None,
    cache_dir,
    blind: bool,
    model: bool = True,
):
    """`{"checkpoint", "step", "split", "metrics", "blind"}` (INTERFACES.md §3) for a loaded run;
    `model=False` skips the model's own metrics (only the blind baseline)."""
    import types

    from jaxvlm import data as data_lib
    from jaxvlm import evals

    config = run.config
    if not config.evals:
        raise ValueError(f"the config saved in {run.workdir} names no evaluators (config.evals)")
    with config.unlocked():
        for fields in config.evals.values():
            fields.split = split
    if world_dir is not None:
        world = data_lib.load_world(str(world_dir))
    else:
        world = data_lib.open_world(config.data.world, cache_dir)
    context = types.SimpleNamespace(
        world=world, tokenizer=run.tokenizer, preprocessing=run.preprocessing
    )
    metrics = {}
    if model:
        evaluators = evals.setup_evals(config, run.model, run.mesh, context)
        metrics = _run_all(evaluators, run.params, run.step)
    result = {
        "checkpoint": (
            str(run.workdir / "checkpoints" / str(run.step))
            if (run.workdir / "checkpoints").is_dir()
            else str(run.workdir)  # a foreign checkpoint converted on load
        ),
        "step": run.step,
        "split": split,
        "metrics": metrics,
        "blind": {},
    }
    if blind and evals.has_generative(config):
        blind_evaluators = evals.setup_evals(config, run.model, run.mesh, context, blind=True)
        result["blind"] = _run_all(blind_evaluators, blind_params(config, run.params), run.step)
    return result


def _run_all(evaluators, params, step) -> dict[str, float]:
    from jaxvlm import evals

    results = evals.run_evals(evaluators, params, step, _NullWriter(), force=True)
    merged, owner = {}, {}
    for name, metrics in results.items():
        for key, value in metrics.items():
            if key in merged:
                raise ValueError(
                    f"config.evals.{owner[key]} and config.evals.{name} both report {key!r}, "
                    "but a result holds one value per metric name"
                )
            merged[key], owner[key] = value, name
    return merged


def evaluate_workdir(
    workdir: str | Path,
    *,
    split: str,
    cache_dir: str | Path,
    step: int | None = None,
    overrides: dict | None = None,
    world_dir: str | Path | None = None,
    verify: bool = False,
    blind: bool = True,
) -> dict:
    """`{"checkpoint", "step", "split", "metrics", "blind"}` for the run in `workdir`."""
    run = load_run(workdir, cache_dir=cache_dir, step=step, overrides=overrides, verify=verify)
    return evaluate_run(run, split=split, world_dir=world_dir, cache_dir=cache_dir, blind=blind)


class _NullWriter:
    def write(self, step, scalars) -> None: ...


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxvlm.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    selector = parser.add_mutually_exclusive_group(required=True)
    selector.add_argument("--workdir", help="a jaxvlm run directory (train or convert wrote it)")
    selector.add_argument(
        "--checkpoint", help="a Hugging Face directory or .gguf file, converted on load"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--split", default="test", choices=("test", "test_novel", "validation"))
    parser.add_argument("--data", default=None, help="a world directory (default: the run's world)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--verify", action="store_true", help="re-hash frozen sources in full")
    parser.add_argument("--no-blind", action="store_true", help="skip the blind baseline")
    parser.add_argument("--cache-dir", default=None)
    args, rest = parser.parse_known_args(argv)
    cli.setup_logging()
    with cli.user_errors("jaxvlm.evaluate"):
        overrides = config_utils.split_override_args(rest)
        cache_dir = cli.cache_dir_from(args.cache_dir)
        if args.data is not None and not Path(args.data).is_dir():
            raise FileNotFoundError(f"--data {args.data} is not a directory")
        if args.checkpoint is not None and (args.step is not None or args.verify):
            raise ValueError("--step and --verify apply to --workdir; --checkpoint has one model")
        cli.start_runtime(cache_dir)
        if args.checkpoint is not None:
            from jaxvlm import convert

            run = convert.load_imported(args.checkpoint)
            override_evals(run.config, overrides)
            result = evaluate_run(
                run,
                split=args.split,
                world_dir=args.data,
                cache_dir=cache_dir,
                blind=not args.no_blind,
            )
        else:
            result = evaluate_workdir(
                args.workdir,
                split=args.split,
                cache_dir=cache_dir,
                step=args.step,
                overrides=overrides,
                world_dir=args.data,
                verify=args.verify,
                blind=not args.no_blind,
            )
    if args.json:
        print(json.dumps(result))
    else:
        for name, metrics in (("", result["metrics"]), ("blind/", result["blind"])):
            for key, value in metrics.items():
                print(f"{name}{key}\t{value:.4f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

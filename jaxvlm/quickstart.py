"""The no-download main job: `python -m jaxvlm.quickstart [--workdir runs/quickstart] [--bridges llava]`.

Phases: build (or reuse) the synthetic world → pretrain (or reuse) the world ViT (CLIP-style) and the
world LM (text only) → for each selected recipe, train its stages (LLaVA: stage 1, the projector on
captions; stage 2, projector + LLM on instructions, from stage 1; BLIP-2 with `--bridges blip2`:
Q-Former stage 1, stage 2 into the world LM and into the world T5 (pretrained on the world's text
the first time it is needed), the VQA fine-tune and the no-stage-1 ablation) →
evaluate every model on `test` and `test_novel`, generative models beside the blind baseline (the
frozen world LM, same template and prompt, no image) → print a table and write `metrics.json`,
`report.md` and `loss_curves.png` into the workdir (INTERFACES.md §3).

Every phase is skipped when already done, so re-running is cheap and an interrupted run resumes.
Backbones live in the cache (`<cache>/backbones/<config-hash>/`) and appear in the workdir as links
named after their rows (`backbone_vit`, `backbone_lm`); each trained model is an ordinary workdir
`<workdir>/<config>_<stage>` (usable with `python -m jaxvlm.evaluate --workdir` and
`python -m jaxvlm.generate --workdir`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from jaxvlm import cli, config_utils

logger = logging.getLogger("jaxvlm.quickstart")

SPLITS = ("test", "test_novel")
BACKBONE_SCORES = "quickstart_scores.json"  # a finished backbone's rows, cached in its directory


@dataclasses.dataclass(frozen=True)
class Stage:
    """One trained model of a recipe: row `<config>_<name>`, config argument, the stage whose
    workdir it starts from (`config.init_from`), and the blind-baseline row its config gives
    (its frozen LLM with its template, prompts and decoding, the image removed), if any."""

    name: str
    config_arg: str
    init_from: str | None = None
    blind_row: str | None = None


# The quickstart's recipes, by config name (INTERFACES.md §4: `--bridges` values).
RECIPES: dict[str, tuple[Stage, ...]] = {
    "llava": (
        Stage("stage1", "stage=1"),
        Stage("stage2", "stage=2", init_from="stage1", blind_row="blind"),
    ),
    # BLIP-2 (papers.md §1): stage 1 (Q-Former alone, retrieval), stage 2 into the frozen world
    # LM (zero-shot VQA and captions) and into the frozen world T5 (prefix LM; the FlanT5
    # prompt), the VQA fine-tune from stage 2 (question into the Q-Former), and the paper's
    # ablation: stage 2 without stage 1 (stage 2's template, prompts and decoding: `blind_blip2`).
    "blip2": (
        Stage("stage1", "stage=1"),
        Stage("stage2_decoder", "stage=2", init_from="stage1"),
        Stage("stage2_encdec", "stage=2,llm=t5", init_from="stage1", blind_row="blind_blip2_t5"),
        Stage("vqa_ft", "stage=vqa", init_from="stage2_decoder"),
        Stage("no_stage1", "stage=2", blind_row="blind_blip2"),
    ),
}


def parse_bridges(text: str) -> list[str]:
    """`--bridges llava[,blip2,...]|all` → recipe names, validated."""
    names = list(RECIPES) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [name for name in names if name not in RECIPES]
    if unknown or not names:
        raise ValueError(
            f"--bridges {text!r}: unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}, all"
        )
    return names


class Metrics:
    """`metrics.json` of the quickstart, merged across runs (rows of finished phases are kept)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.data.setdefault("timings_s", {})
        self.data.setdefault("results", {})

    def time(self, phase: str, seconds: float) -> None:
        self.data["timings_s"][phase] = round(seconds, 2)
        self.save()

    def set(self, model: str, split: str, metrics: dict) -> None:
        self.data["results"].setdefault(model, {})[split] = metrics
        self.save()

    def drop(self, model: str) -> None:
        self.data["results"].pop(model, None)
        self.save()

    def has(self, model: str) -> bool:
        rows = self.data["results"].get(model, {})
        return all(split in rows for split in SPLITS)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, sort_keys=True))


def run(
    workdir: Path,
    cache_dir: Path,
    configs_dir: Path,
    *,
    bridges: tuple[str, ...] = ("llava",),
    size: str = "default",
    overrides: dict[str, dict] | None = None,
) -> dict:
    """All phases. `size` is the configs' size argument (`tiny` in tests); `overrides` are
    config overrides per recipe, applied to each of its stages (e.g. {"llava":
    {"train.num_steps": 40}} in tests)."""
    from jaxvlm import data

    workdir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(workdir / "metrics.json")
    pretrain = configs_dir / "backbones_pretrain.py"
    vit_spec, lm_spec = f"{pretrain}:model=vit,size={size}", f"{pretrain}:model=lm,size={size}"
    phases = [
        ("world", lambda: data.open_world(_world_config(lm_spec), cache_dir)),
        ("backbone_vit", lambda: _backbone(workdir, "backbone_vit", vit_spec, cache_dir, metrics)),
        ("backbone_lm", lambda: _backbone(workdir, "backbone_lm", lm_spec, cache_dir, metrics)),
    ]
    for recipe in bridges:
        for stage in RECIPES[recipe]:
            spec = f"{configs_dir / recipe}.py:{stage.config_arg},size={size}"
            phases.append(
                (
                    f"{recipe}_{stage.name}",
                    _stage_phase(
                        workdir,
                        recipe,
                        stage,
                        spec,
                        cache_dir,
                        metrics,
                        (overrides or {}).get(recipe),
                    ),
                )
            )
    for phase, action in phases:
        start = time.perf_counter()
        logger.info("phase %s", phase)
        action()
        metrics.time(phase, time.perf_counter() - start)
    curves = _loss_curves(workdir, bridges)
    if curves:
        plot_losses(curves, workdir / "loss_curves.png")
    report = render_report(metrics.data, has_plot=bool(curves))
    (workdir / "report.md").write_text(report)
    print(report)
    return metrics.data


def _world_config(config_spec: str):
    from jaxvlm import config_utils

    return config_utils.load_config(config_spec).data.world


def _backbone(workdir, row, spec, cache_dir, metrics) -> Path:
    from jaxvlm import backbones, evaluate

    path = backbones.ensure_backbone(spec, cache_dir)[0]
    if _link(workdir / row, path):
        metrics.drop(row)  # another backbone than the one these rows measured
    if not metrics.has(row):
        # A backbone never changes once finished, so its scores are cached beside it.
        scores_file = path / BACKBONE_SCORES
        scores = json.loads(scores_file.read_text()) if scores_file.is_file() else {}
        for split in SPLITS:
            if split not in scores:
                scored = evaluate.evaluate_workdir(
                    path, split=split, cache_dir=cache_dir, blind=False
                )
                scores[split] = scored["metrics"]
                if jax_process_index() == 0:
                    scores_file.write_text(json.dumps(scores, indent=2))
            metrics.set(row, split, scores[split])
    return path


def jax_process_index() -> int:
    import jax

    return jax.process_index()


def _stage_phase(workdir, recipe, stage, spec, cache_dir, metrics, overrides):
    """Trains the stage unless its workdir holds the final step, then fills its rows (and the
    blind rows its `blind_row` names)."""

    def action():
        from jaxvlm import checkpoint, config_utils, evaluate, train

        row = f"{recipe}_{stage.name}"
        stage_dir = workdir / row
        stage_overrides = dict(overrides or {})
        if stage.init_from:
            stage_overrides["init_from"] = str(workdir / f"{recipe}_{stage.init_from}")
        config = config_utils.load_config(spec, stage_overrides)
        done = False
        if (stage_dir / "checkpoints").is_dir():
            with checkpoint.Checkpointer(stage_dir, read_only=True) as checkpointer:
                done = checkpointer.latest_step() == config.train.num_steps
        if not done:
            metrics.drop(row)
            summary = train.train(config, stage_dir, cache_dir=cache_dir)
            metrics.set(row, "test", _flatten(summary["evals"]))  # the config evaluates `test`
        blind_row = stage.blind_row
        for split in SPLITS:
            need_model = split not in metrics.data["results"].get(row, {})
            need_blind = bool(blind_row) and split not in metrics.data["results"].get(blind_row, {})
            if not (need_model or need_blind):
                continue
            run = evaluate.load_run(stage_dir, cache_dir=cache_dir)
            if need_model:
                scored = evaluate.evaluate_run(
                    run, split=split, world_dir=None, cache_dir=cache_dir, blind=need_blind
                )
                metrics.set(row, split, scored["metrics"])
            else:
                scored = evaluate.evaluate_run(
                    run, split=split, world_dir=None, cache_dir=cache_dir, blind=True, model=False
                )
            if need_blind:
                metrics.set(blind_row, split, scored["blind"])

    return action


def _flatten(evals: dict) -> dict:
    return {k: v for metrics in evals.values() for k, v in metrics.items()}


def _link(link: Path, target: Path) -> bool:
    """Points `link` at `target`; True when it pointed at something else before."""
    changed = False
    if link.is_symlink() or link.exists():
        if link.resolve() == Path(target).resolve():
            return False
        link.unlink()
        changed = True
    link.symlink_to(Path(target).absolute(), target_is_directory=True)
    return changed


def _loss_curves(workdir: Path, bridges) -> dict[str, list[tuple[int, float]]]:
    """{row: [(step, train loss), ...]} from each trained model's metrics.jsonl."""
    curves = {}
    for recipe in bridges:
        for stage in RECIPES[recipe]:
            row = f"{recipe}_{stage.name}"
            path = workdir / row / "metrics.jsonl"
            if not path.is_file():
                continue
            points = []
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if "train/loss" in record:
                    points.append((int(record["step"]), float(record["train/loss"])))
            if points:
                curves[row] = points
    return curves


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """A PNG line chart of training loss against step, one colour per model (Pillow only)."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 400, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    max_step = max(step for points in curves.values() for step, _ in points) or 1
    losses = [loss for points in curves.values() for _, loss in points]
    low, high = min(losses), max(losses)
    high = high if high > low else low + 1.0

    def to_xy(step, loss):
        x = margin + (width - 2 * margin) * step / max_step
        y = height - margin - (height - 2 * margin) * (loss - low) / (high - low)
        return x, y

    draw.line(
        [(margin, margin), (margin, height - margin), (width - margin, height - margin)], "black"
    )
    draw.text((margin, height - margin + 8), "0", fill="black")
    draw.text((width - margin - 20, height - margin + 8), f"step {max_step}", fill="black")
    draw.text((4, margin - 12), f"loss {high:.2f}", fill="black")
    draw.text((4, height - margin - 12), f"{low:.2f}", fill="black")
    colours = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
    for index, (row, points) in enumerate(sorted(curves.items())):
        colour = colours[index % len(colours)]
        draw.line([to_xy(step, loss) for step, loss in points], fill=colour, width=2)
        draw.text((width - margin - 140, margin + 14 * index), row, fill=colour)
    image.save(path)


def render_report(data: dict, *, has_plot: bool = False) -> str:
    """report.md: one table row per (model, split), one column per metric; then the timings."""
    results = data["results"]
    names = sorted({metric for rows in results.values() for m in rows.values() for metric in m})
    lines = ["# jaxvlm quickstart", ""]
    lines += ["| model | split | " + " | ".join(names) + " |"]
    lines += ["|---|---|" + "---|" * len(names)]
    for model, rows in sorted(results.items()):
        for split, values in sorted(rows.items()):
            cells = [f"{values[n]:.2f}" if n in values else "" for n in names]
            lines.append(f"| {model} | {split} | " + " | ".join(cells) + " |")
    lines += ["", "| phase | seconds |", "|---|---|"]
    lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in data["timings_s"].items()]
    if has_plot:
        lines += ["", "![training loss](loss_curves.png)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxvlm.quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", default="runs/quickstart", help="output directory")
    parser.add_argument(
        "--bridges",
        default="llava",
        help=f"recipes to train, comma-separated, or all (known: {', '.join(RECIPES)})",
    )
    parser.add_argument("--cache-dir", default=None, help="worlds and backbones cache")
    parser.add_argument("--configs-dir", default=None, help="the configs/ directory to use")
    args = parser.parse_args(argv)
    cli.setup_logging()
    with cli.user_errors("jaxvlm.quickstart"):
        bridges = tuple(parse_bridges(args.bridges))
        configs_dir = config_utils.find_configs_dir(args.configs_dir)
        cache_dir = cli.cache_dir_from(args.cache_dir)
        cli.start_runtime(cache_dir)
        run(Path(args.workdir).absolute(), cache_dir, configs_dir, bridges=bridges)


if __name__ == "__main__":
    main()

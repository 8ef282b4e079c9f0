"""The no-download main job: `python -m jaxvlm.quickstart [--workdir runs/quickstart]`.

Phases: build (or reuse) the synthetic world → pretrain (or reuse) the world ViT (CLIP-style) and the
world LM (text only) → evaluate both on `test` and `test_novel` → print a table and write `metrics.json`
and `report.md` into the workdir (INTERFACES.md §3). Every phase is cached or skipped when already done, so
re-running is cheap. Backbones live in the cache (`<cache>/backbones/<config-hash>/`) and are reused by
every later job; each appears in the workdir as a link named after its row (`backbone_vit`,
`backbone_lm`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from jaxvlm import cli

logger = logging.getLogger("jaxvlm.quickstart")

SPLITS = ("test", "test_novel")


def find_configs_dir(configs_dir: str | None) -> Path:
    """`--configs-dir`, else the repository's `configs/` (an editable install)."""
    candidates = (
        [Path(configs_dir)]
        if configs_dir
        else [
            Path(__file__).resolve().parents[1] / "configs",
            Path.cwd() / "configs",
        ]
    )
    for candidate in candidates:
        if (candidate / "common.py").is_file():
            return candidate.absolute()
    raise FileNotFoundError(
        f"no configs directory found (looked in {', '.join(map(str, candidates))}); install from a "
        "clone with `pip install -e .` or pass --configs-dir"
    )


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


def run(workdir: Path, cache_dir: Path, configs_dir: Path, *, size: str = "default") -> dict:
    """All phases; `size` is the configs' size argument (`tiny` in tests)."""
    from jaxvlm import backbones, data, evaluate

    workdir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(workdir / "metrics.json")
    pretrain = configs_dir / "backbones_pretrain.py"
    vit_spec, lm_spec = f"{pretrain}:model=vit,size={size}", f"{pretrain}:model=lm,size={size}"
    phases = [
        ("world", lambda: data.open_world(_world_config(lm_spec), cache_dir)),
        ("backbone_vit", lambda: backbones.ensure_backbone(vit_spec, cache_dir)[0]),
        ("backbone_lm", lambda: backbones.ensure_backbone(lm_spec, cache_dir)[0]),
    ]
    results = {}
    for phase, action in phases:
        start = time.perf_counter()
        logger.info("phase %s", phase)
        results[phase] = action()
        if phase.startswith("backbone_"):
            if _link(workdir / phase, results[phase]):
                metrics.drop(phase)  # another backbone than the one these rows measured
            if not metrics.has(phase):
                for split in SPLITS:
                    scored = evaluate.evaluate_workdir(
                        results[phase], split=split, cache_dir=cache_dir
                    )
                    metrics.set(phase, split, scored["metrics"])
        metrics.time(phase, time.perf_counter() - start)
    report = render_report(metrics.data)
    (workdir / "report.md").write_text(report)
    print(report)
    return metrics.data


def _world_config(config_spec: str):
    from jaxvlm import config_utils

    return config_utils.load_config(config_spec).data.world


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


def render_report(data: dict) -> str:
    lines = ["# jaxvlm quickstart", "", "| model | split | metric | value |", "|---|---|---|---|"]
    for model, rows in sorted(data["results"].items()):
        for split, values in sorted(rows.items()):
            for metric, value in sorted(values.items()):
                lines.append(f"| {model} | {split} | {metric} | {value:.2f} |")
    lines += ["", "| phase | seconds |", "|---|---|"]
    lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in data["timings_s"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxvlm.quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", default="runs/quickstart", help="output directory")
    parser.add_argument("--cache-dir", default=None, help="worlds and backbones cache")
    parser.add_argument("--configs-dir", default=None, help="the configs/ directory to use")
    args = parser.parse_args(argv)
    cli.setup_logging()
    with cli.user_errors("jaxvlm.quickstart"):
        cache_dir = cli.cache_dir_from(args.cache_dir)
        cli.start_runtime(cache_dir)
        run(Path(args.workdir).absolute(), cache_dir, find_configs_dir(args.configs_dir))


if __name__ == "__main__":
    main()

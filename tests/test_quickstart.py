"""The quickstart on tiny configs: phases, metrics.json (INTERFACES.md §3), re-runs skip work."""

import json
import subprocess
import sys

import pytest
from helpers import CONFIGS, REPO

from jaxvlm import quickstart


@pytest.mark.slow
def test_quickstart_writes_metrics_and_skips_finished_phases(tmp_path, cache_dir):
    workdir = tmp_path / "qs"
    quickstart.run(workdir, cache_dir, CONFIGS, size="tiny")
    data = json.loads((workdir / "metrics.json").read_text())
    assert {"world", "backbone_vit", "backbone_lm"} <= set(data["timings_s"])
    for split in ("test", "test_novel"):
        assert 0 <= data["results"]["backbone_vit"][split]["r1_image_to_text"] <= 100
        assert data["results"]["backbone_lm"][split]["perplexity"] > 1
    assert (workdir / "backbone_vit" / "checkpoints").is_dir()
    assert "| backbone_lm | test | perplexity |" in (workdir / "report.md").read_text()

    first = data["timings_s"]["backbone_lm"]
    quickstart.run(workdir, cache_dir, CONFIGS, size="tiny")
    again = json.loads((workdir / "metrics.json").read_text())
    assert again["results"] == data["results"]
    assert again["timings_s"]["backbone_lm"] < first  # reused, not retrained


def test_quickstart_help_and_missing_configs_dir(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jaxvlm.quickstart", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--workdir" in result.stdout
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxvlm.quickstart",
            "--workdir",
            str(tmp_path / "q"),
            "--configs-dir",
            str(tmp_path / "nowhere"),
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no configs directory found" in result.stderr and "pip install -e ." in result.stderr

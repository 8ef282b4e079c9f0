"""The quickstart on tiny configs: phases, metrics.json (INTERFACES.md §3), re-runs skip work."""

import json
import subprocess
import sys

import pytest
from helpers import CONFIGS, QUICKSTART_OVERRIDES, REPO

from jaxvlm import quickstart

ROWS = ("backbone_vit", "backbone_lm", "blind", "llava_stage1", "llava_stage2")


@pytest.mark.slow
def test_quickstart_writes_every_row_and_stage2_beats_blind(quickstart_workdir):
    data = json.loads((quickstart_workdir / "metrics.json").read_text())
    assert set(data["timings_s"]) == {
        "world",
        "backbone_vit",
        "backbone_lm",
        "llava_stage1",
        "llava_stage2",
    }
    assert set(data["results"]) == set(ROWS)
    for split in ("test", "test_novel"):
        assert 0 <= data["results"]["backbone_vit"][split]["r1_image_to_text"] <= 100
        assert data["results"]["backbone_lm"][split]["perplexity"] > 1
        for row in ("blind", "llava_stage1", "llava_stage2"):
            assert set(data["results"][row][split]) == {"vqa_accuracy", "cider"}
    stage2, blind = data["results"]["llava_stage2"]["test"], data["results"]["blind"]["test"]
    assert stage2["vqa_accuracy"] > blind["vqa_accuracy"]
    for row in ("backbone_vit", "backbone_lm", "llava_stage1", "llava_stage2"):
        assert (quickstart_workdir / row / "checkpoints").is_dir()
    for row in ("backbone_vit", "backbone_lm"):  # scored once, reused by every later quickstart
        cached = json.loads((quickstart_workdir / row / quickstart.BACKBONE_SCORES).read_text())
        assert cached == data["results"][row]
    report = (quickstart_workdir / "report.md").read_text()
    assert "| llava_stage2 | test |" in report and "loss_curves.png" in report
    assert (quickstart_workdir / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quickstart_rerun_skips_finished_phases(quickstart_workdir, cache_dir):
    before = json.loads((quickstart_workdir / "metrics.json").read_text())
    quickstart.run(
        quickstart_workdir,
        cache_dir,
        CONFIGS,
        size="tiny",
        overrides={"llava": QUICKSTART_OVERRIDES},
    )
    after = json.loads((quickstart_workdir / "metrics.json").read_text())
    assert after["results"] == before["results"]
    for phase in ("backbone_lm", "llava_stage1", "llava_stage2"):
        # Reused, not retrained (a backbone another test already cached took ~0 s both times).
        assert after["timings_s"][phase] < max(before["timings_s"][phase], 1.0), phase


def test_unknown_bridge_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        quickstart.main(["--bridges", "llava,flamingoo", "--workdir", "/nonexistent/q"])
    error = capsys.readouterr().err.strip()
    assert "flamingoo" in error and "known: llava" in error and len(error.splitlines()) == 1


def test_quickstart_help_and_missing_configs_dir(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jaxvlm.quickstart", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--workdir" in result.stdout and "--bridges" in result.stdout
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

"""Two CPU processes over gloo (launch/multiprocess.sh) train exactly like one process."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest
from helpers import CONFIGS, REPO

from jaxvlm import checkpoint

STEPS = 3
FLAGS = [
    f"--config.train.num_steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.progress_bar=False",
    "--config.train.checkpoint_every=3",
]


def losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, cache_dir):
    config = f"{CONFIGS}/backbones_pretrain.py:model=lm,size=tiny"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    common = [f"--cache-dir={cache_dir}", *FLAGS]
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxvlm.train",
            f"--config={config}",
            f"--workdir={tmp_path / 'one'}",
            *common,
        ],
        env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(
        ["bash", str(REPO / "launch" / "multiprocess.sh"), config, str(tmp_path / "two"), *common],
        env={**env, "NUM_PROCESSES": "2", "DEVICES_PER_PROCESS": "2"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
    chex.assert_trees_all_close(
        checkpoint.read_params(tmp_path / "two"),
        checkpoint.read_params(tmp_path / "one"),
        rtol=1e-5,
        atol=1e-6,
    )

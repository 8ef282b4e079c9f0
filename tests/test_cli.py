"""Every CLI answers --help with a usage a newcomer can follow, and bad flags fail in one line."""

import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.parametrize(
    "module,expected",
    [
        ("jaxvlm.train", "--config"),
        ("jaxvlm.evaluate", "--workdir"),
        ("jaxvlm.generate", "--prompt"),
        ("jaxvlm.quickstart", "--workdir"),
        ("jaxvlm.data.world", "--held-out"),
    ],
)
def test_help(module, expected):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


def test_train_without_required_flags_is_one_line(capsys):
    from jaxvlm import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.train_main(["--workdir=/tmp/never"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "jaxvlm.train: error: --config and --workdir are required (see --help)"
    )

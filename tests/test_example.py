"""The worked example (examples/digits.py) runs, in its reduced form."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_digits_example_runs_and_plots(tmp_path):
    plot = tmp_path / "digits.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits.py"), "--quick", "--plot", str(plot)],
        capture_output=True, text=True, timeout=600, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["dense", "sparse"]
    density = [line for line in lines if line.startswith("block density")][0].split()
    assert float(density[-2]) == 1.0 and float(density[-1]) == 0.25
    accuracy = [line for line in lines if line.startswith("test accuracy")][0].split()
    assert float(accuracy[-1]) > 0.5  # ten classes: chance is 0.1
    assert plot.stat().st_size > 10_000

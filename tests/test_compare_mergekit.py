"""Agreement with mergekit 0.1.5 (ties, dare_linear, task_arithmetic) on small random checkpoints.

mergekit is not a dependency: this runs only when MERGEKIT_YAML names its `mergekit-yaml` (installed in a
separate environment, see bench/compare_mergekit.py), and is skipped otherwise."""
import os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT = os.environ.get("MERGEKIT_YAML", "")


@pytest.mark.skipif(not (MERGEKIT and Path(MERGEKIT).exists()), reason="set MERGEKIT_YAML to a mergekit 0.1.5 mergekit-yaml")
def test_agrees_with_mergekit():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_mergekit.py")], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "worst max abs difference" in out.stdout

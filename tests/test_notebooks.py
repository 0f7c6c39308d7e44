"""Run every notebook in nbs/ with nbdev's own runner, so `#| eval: false` and tst_flags behave as in `nbdev-test`.

NB_FLAGS=slow (or "slow gpu") also runs the flagged cells. NB_SAVE=1 writes the outputs back into the
notebook on success (how the examples keep their outputs)."""
import os
from pathlib import Path

import pytest
from nbdev.test import test_nb as run_notebook  # renamed: pytest would collect a `test_*` name

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").rglob("*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts and not p.name.startswith("_"))
ALL_FLAGS = {"slow", "gpu"}


def skipped_flags():
    "Flags whose cells are skipped: every tst_flag not named in NB_FLAGS."
    return sorted(ALL_FLAGS - set(os.environ.get("NB_FLAGS", "").split()))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[str(p.relative_to(ROOT / "nbs")) for p in NOTEBOOKS])
def test_notebook(nb):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ok, secs = run_notebook(nb, skip_flags=skipped_flags(), save=os.environ.get("NB_SAVE") == "1",
                            cell_timeout=1800)
    assert ok, f"{nb.name} failed (see the traceback above)"

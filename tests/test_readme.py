"""The README's results table is what `demo.results_table` makes of the committed demo report."""
import json
from pathlib import Path

from av_nbdev.demo import readme_section, results_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_the_committed_report():
    report = json.loads((ROOT / "nbs" / "images" / "demo_report.json").read_text())
    assert readme_section((ROOT / "README.md").read_text()) == results_table(report), \
        'README table out of date: python -c "from av_nbdev.demo import update_readme; update_readme()"'


def test_report_paths_resolve_beside_it():
    report = json.loads((ROOT / "nbs" / "images" / "demo_report.json").read_text())
    for knob in report["knobs"].values():
        assert not Path(knob["vector"]).is_absolute()
    assert not Path(report["base"]).is_absolute()

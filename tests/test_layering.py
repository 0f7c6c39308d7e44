"""The import graph is the data flow: each module imports only modules listed before it, every import counted
(inside functions too), and no module imports another module's underscore names."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "av_nbdev"
ORDER = ["core", "data", "models", "scoring", "stages", "train", "tensorio", "vectors", "compose", "knobs", "judge",
         "sweep", "baselines", "panel", "real", "demo", "cli"]
PIPELINE = {"scoring", "stages", "train", "judge", "sweep", "baselines", "real", "demo", "cli"}


def imports(module: str) -> list[tuple[str, str | None, int]]:
    "(imported av_nbdev module, imported name or None, line) for every import in `module`, nested ones included."
    tree = ast.parse((PKG / f"{module}.py").read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1: target = node.module  # from .x import y
            elif node.module and node.module.startswith("av_nbdev."): target = node.module.split(".", 1)[1]
            elif node.module == "av_nbdev": target = None  # from av_nbdev import x: submodules by name
            else: continue
            for a in node.names:
                if target is None: out.append((a.name, None, node.lineno))
                else: out.append((target, a.name, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("av_nbdev."): out.append((a.name.split(".")[1], None, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("av_nbdev."):
            out.append((node.args[0].value.split(".")[1], None, node.lineno))
    return out


def test_every_module_is_placed():
    found = {p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_")}
    assert found == set(ORDER), f"modules not in the layering table: {found ^ set(ORDER)}"


@pytest.mark.parametrize("module", ORDER)
def test_imports_follow_the_data_flow(module):
    allowed = set(ORDER[:ORDER.index(module) + 1])
    bad = [(t, n, ln) for t, n, ln in imports(module) if t not in allowed]
    assert not bad, f"{module} imports modules listed after it: {bad}"


@pytest.mark.parametrize("module", ORDER)
def test_no_underscore_imports_across_modules(module):
    bad = [(t, n, ln) for t, n, ln in imports(module) if n and n.startswith("_") and t != module]
    assert not bad, f"{module} imports other modules' underscore names: {bad}"


def test_the_named_rules():
    targets = lambda m: {t for t, _, _ in imports(m)}
    assert not targets("scoring") & {"train", "judge"}
    assert not targets("models") & PIPELINE
    assert "scoring" in targets("train") and "scoring" in targets("judge")
    assert "stages" in targets("train") and "stages" in targets("real") and "stages" in targets("demo")


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    "A module that breaks both rules (inside a function) is caught: the checks above can fail."
    (tmp_path / "core.py").write_text("def f():\n    from av_nbdev.demo import _job\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path)
    assert imports("core") == [("demo", "_job", 2)]

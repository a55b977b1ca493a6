"""The import layers (pyproject.toml, checked by tools/lint_imports.py in `make lint`) hold,
and a deliberate upward import, or a stage importing the sink, breaks them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lint_imports", ROOT / "tools" / "lint_imports.py")
lint_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lint_imports)


def test_the_tree_keeps_every_contract(tmp_path):
    result = lint_imports.lint(lint_imports.lay_out(tmp_path / "graph"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


# (new module, its source, an edit of the contracts naming it (or None), the broken import)
VIOLATIONS = [
    (
        "models/_up.py",
        "from capgap.pipeline import curate\n",
        None,
        "models._up -> capgap.pipeline",
    ),
    ("core/_up.py", "import capgap.models.metrics\n", None, "core._up -> capgap.models.metrics"),
    (
        "transforms/stage.py",
        "def f():\n    from capgap.transforms import write\n",  # a lazy import counts too
        ('"capgap.transforms.dedup",', '"capgap.transforms.dedup", "capgap.transforms.stage",'),
        "transforms.stage -> capgap.transforms.write",
    ),
    (
        "pipeline/command.py",
        "from capgap.pipeline import demo\n",
        ('"curate | train |', '"curate | command | train |'),
        "pipeline.command -> capgap.pipeline.demo",
    ),
]


@pytest.mark.parametrize(("module", "source", "edit", "broken"), VIOLATIONS)
def test_an_upward_import_breaks_a_contract(tmp_path, module, source, edit, broken):
    tree = lint_imports.lay_out(tmp_path / "graph", copy=True)
    (tree / "capgap" / module).write_text(source, encoding="utf-8")
    config = ROOT / "pyproject.toml"
    if edit is not None:
        text = config.read_text(encoding="utf-8")
        assert edit[0] in text
        config = tmp_path / "pyproject.toml"
        config.write_text(text.replace(edit[0], edit[1]), encoding="utf-8")
    result = lint_imports.lint(tree, config)
    assert result.returncode == 1, result.stdout
    assert broken in result.stdout

"""The CLI is quiet and conventional: no third-party noise a user cannot act on, every
``--help`` keeps its examples one per line, bad config keys exit with one line.

    .venv/bin/python -m pytest -q tests/test_cli.py
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import subprocess
import sys

import pytest

from capgap.core import console
from capgap.pipeline.cli import COMMANDS


def capgap(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "capgap.pipeline.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_curate_help_imports_beam_without_the_apitools_warning():
    result = capgap("curate", "--help")
    assert result.returncode == 0, result.stderr
    assert "apitools" not in result.stdout + result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_keeps_the_docstring_examples_one_per_line(command):
    module = importlib.import_module(f"capgap.pipeline.{COMMANDS[command][0]}")
    examples = [
        line.strip()
        for line in (module.__doc__ or "").splitlines()
        if line.strip().startswith(f"capgap {command}")
    ]
    assert examples, f"{command}: its docstring shows no example"
    result = capgap(command, "--help")
    assert result.returncode == 0, result.stderr
    lines = {line.strip() for line in result.stdout.splitlines()}
    assert [e for e in examples if e not in lines] == []


def test_a_bad_config_key_exits_with_one_line():
    result = capgap("synth", "--set", "no_such_key=1")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("capgap synth: unknown config key no_such_key")


def test_noise_filters_drop_only_the_listed_messages(caplog, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    console.quiet_third_party_output()
    console.quiet_third_party_output()  # idempotent: one filter per logger
    hf = logging.getLogger("transformers.modeling_utils")
    assert sum(isinstance(f, console.DropThirdPartyNoise) for f in hf.filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger().warning("apitools not found, and bigquery client libraries are not")
        hf.warning("We strongly recommend passing in an `attention_mask` since ...")
        hf.warning("Some weights of the model checkpoint were not used")
        logging.getLogger().warning("something else")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Some weights of the model checkpoint were not used", "something else"]
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_the_console_script_exits_with_mains_code():
    """``python -m capgap.pipeline.cli`` runs ``entry``, the console script: main's code comes
    out as the exit status (2: an unknown command)."""
    result = capgap("no-such-command")
    assert result.returncode == 2 and "unknown command 'no-such-command'" in result.stderr


def test_main_itself_leaves_the_collector_alone():
    """Only ``entry``, about to exit, freezes the objects alive; a caller of ``main`` that
    goes on (a notebook, a test) keeps collecting them."""
    from capgap.pipeline import cli

    before = gc.get_freeze_count()
    assert cli.main(["--version"]) == 0
    assert gc.get_freeze_count() == before


def test_the_console_script_freezes_what_is_alive_before_exit():
    """Shutdown's collections then skip torch's, transformers' and Beam's objects (~1.3 s of
    each command's exit on a 2-core VM); checked from an atexit handler, which runs after."""
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
        "from capgap.pipeline.cli import entry\n"
        "sys.argv = ['capgap', '--version']\n"
        "entry()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "frozen True"

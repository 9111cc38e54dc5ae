"""The package's own checks: ruff (lint, imports, lines of at most 120 characters) and mypy
over the whole package, which ships `py.typed` and so promises typed public calls."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean():
    out = run("ruff", "check", "hyparflow", "tests")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean():
    out = run("mypy", "hyparflow")
    assert out.returncode == 0, out.stdout + out.stderr

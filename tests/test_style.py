"""One code style for the whole tree: `ruff format` (2-space indent, double quotes, 100 columns;
settings in pyproject.toml) and ruff's pyflakes checks (unused imports, undefined names)."""

import subprocess
import sys

from helpers import REPO


def _ruff(*args):
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120
  )


def test_tree_is_formatted():
  r = _ruff("format", "--check", ".")
  assert r.returncode == 0, f"run `ruff format .` in the repository:\n{r.stdout}{r.stderr}"


def test_lint_is_clean():
  r = _ruff("check", ".")
  assert r.returncode == 0, r.stdout + r.stderr

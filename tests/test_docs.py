"""The README's quick start is what CI runs, and every config variant it names exists."""

import os
import re

import pytest

from helpers import REPO, load_config


def _readme():
  with open(os.path.join(REPO, "README.md")) as f:
    return f.read()


def test_ci_runs_the_readme_test_command():
  blocks = re.findall(r"```bash\n(.*?)```", _readme(), re.S)
  test_cmd = [b.strip() for b in blocks if "pytest" in b]
  assert len(test_cmd) == 1
  with open(os.path.join(REPO, ".ci", "run")) as f:
    assert test_cmd[0] in f.read()


@pytest.mark.parametrize("name", ["iris_pad", "synthetic_faces", "chest_xray", "shortcut"])
@pytest.mark.parametrize(
  "variant",
  [
    None,
    "quick",
    "quick,cyborg",
    "difference,gradcam",
    "cyborg,gradcampp",
    "quick,accel",
    "opposition,single_logit",
    "margin",
    "gradmask",
    "rrr",
    "actdiff",
    "masked",
    "ce",
  ],
)
def test_config_variants(name, variant):
  c = load_config(name, variant)
  assert sum(c.loss.weights.values()) > 0
  if variant and "quick" in variant:
    assert c.model.name == "tiny"


def test_unknown_variant_lists_the_valid_ones():
  with pytest.raises(ValueError, match="valid: quick, ce, cyborg"):
    load_config("iris_pad", "quick,cyborgg")

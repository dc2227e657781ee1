"""Saliency controls (`data.controls`, ``config.data.saliency_control``): what each control map
is, that only the training split is controlled, determinism, and the refusals."""

import json
import os

import ml_collections
import numpy as np
import pytest
from helpers import TINY_RUN, load_config

from divisive_jax import config_base, train
from divisive_jax.data import controls, describe, load_splits, pipeline
from divisive_jax.errors import ConfigError, DataError


def _data(control="none", **fields):
  base = dict(builtin="synthetic_iris", seed=3, num_train=24, num_val=8, num_test=8)
  base.update(image_size=32, channels=1, csv_path="", heldout_attack="")
  return ml_collections.ConfigDict({**base, "saliency_control": control, **fields})


def _all(source):
  return source.read(np.arange(len(source)))


@pytest.fixture(scope="module")
def plain():
  return load_splits(_data(), "")


def test_a_derangement_moves_every_element():
  for n in (2, 3, 10, 101):
    for seed in range(5):
      d = controls.derangement(n, np.random.default_rng(seed))
      assert sorted(d) == list(range(n)) and not np.any(d == np.arange(n))


def test_shuffled_maps_are_other_examples_maps(plain):
  splits = load_splits(_data("shuffled"), "")
  truth, shuffled = _all(plain.train), _all(splits.train)
  np.testing.assert_array_equal(shuffled["image"], truth["image"])  # only the maps change
  has = truth["has_saliency"] > 0
  assert has.sum() >= 2 and np.array_equal(shuffled["has_saliency"], truth["has_saliency"])
  maps, own = shuffled["saliency"], truth["saliency"]
  donor = splits.train._donor  # each example with a map: another's
  assert np.all(donor[has] != np.flatnonzero(has)) and np.all(has[donor[has]])
  np.testing.assert_array_equal(maps[has], own[donor[has]])
  assert not np.any(maps[~has])
  # The same maps, each once (a permutation of the training maps).
  key = lambda m: m.tobytes()
  assert sorted(map(key, maps[has])) == sorted(map(key, own[has]))
  # Validation and test keep the true maps; the control is recorded.
  for s in ("val", "test"):
    np.testing.assert_array_equal(
      _all(getattr(splits, s))["saliency"], _all(getattr(plain, s))["saliency"]
    )
  assert splits.info["saliency_control"] == "shuffled" and plain.info["saliency_control"] == "none"


def test_controls_are_a_function_of_seed_and_example(plain):
  """Read in any batching, in any order: the same map per example; another seed, other maps."""
  for control in ("shuffled", "random"):
    a = load_splits(_data(control), "").train
    whole = _all(a)["saliency"]
    order = np.random.default_rng(0).permutation(len(a))
    pieces = np.concatenate([a.read(order[k : k + 5])["saliency"] for k in range(0, len(a), 5)])
    np.testing.assert_array_equal(pieces, whole[order])
    other = _all(load_splits(_data(control, seed=4), "").train)["saliency"]
    assert not np.array_equal(other, whole), control


def test_inverted_and_random_maps(plain):
  truth = _all(plain.train)
  has = truth["has_saliency"] > 0
  inverted = _all(load_splits(_data("inverted"), "").train)["saliency"]
  np.testing.assert_array_equal(inverted[has], 255 - truth["saliency"][has])
  assert not np.any(inverted[~has])
  rand = _all(load_splits(_data("random"), "").train)["saliency"]
  assert set(np.unique(rand)) <= {0, 255} and not np.any(rand[~has])
  areas = lambda m: (m > 127.5).sum(axis=(1, 2))
  np.testing.assert_array_equal(areas(rand[has]), areas(truth["saliency"][has]))
  assert not np.array_equal(rand[has] > 127.5, truth["saliency"][has] > 127.5)


def test_shuffling_needs_two_maps():
  class OneMap(pipeline.Source):
    channels, ids = 1, np.array(["a", "b", "c"])
    label, attack_type, has_saliency = np.zeros(3, int), np.full(3, -1), np.array([0, 1, 0])

  with pytest.raises(DataError, match=r"saliency_control='shuffled' needs at least 2 .* has 1"):
    controls.apply(OneMap(), "shuffled", 0)


def test_a_run_records_its_control_and_refuses_an_unknown_one(tmp_path, caplog):
  c = load_config("iris_pad", "quick,difference", **TINY_RUN, num_train_steps=2)
  c.data.saliency_control = "inverted"
  c.final_eval = False
  assert "Saliency control 'inverted'" in describe(c.data)
  w = str(tmp_path / "w")
  train.train_and_evaluate(c, w)
  with open(os.path.join(w, "data_info.json")) as f:
    assert json.load(f)["saliency_control"] == "inverted"
  with open(os.path.join(w, "config.json")) as f:
    assert json.load(f)["data"]["saliency_control"] == "inverted"
  c.data.saliency_control = "flipped"
  with pytest.raises(ConfigError, match="config.data.saliency_control='flipped' is not valid"):
    config_base.validate(c)

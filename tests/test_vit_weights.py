"""ViT weights from torchvision and timm files (`models.vit_weights`): our ViT with them computes
the logits torch computed (fixtures written by torch, torchvision and timm themselves:
tests/data/write_vit_fixtures.py), position embeddings resample as torchvision's do, and a file
of another size is refused in one line."""

import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divisive_jax.models import Classifier, torchvision, vit, vit_weights
from divisive_jax.models.weights_file import WeightsError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
EXPECTED = np.load(os.path.join(DATA, "vit_expected.npz"))
NAME = SimpleNamespace(name="vit_test")


def _load(file, size=16, pool="cls", width=16, depth=2, style="torchvision"):
  model = Classifier(vit.ViT(4, width, depth, 2, 32, pool=pool, style=style))
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  path = os.path.join(DATA, file)
  config = SimpleNamespace(name=NAME.name, vit_style=style)
  return model, torchvision.load_torchvision_state_dict(path, config, variables)


@pytest.mark.parametrize(
  "file,key",
  [("vit_torchvision.pth", "torchvision_logits"), ("vit_timm.safetensors", "timm_logits")],
)
def test_logits_equal_the_reference_implementations(file, key):
  model, variables = _load(file)
  logits = model.apply(variables, EXPECTED["x"])
  np.testing.assert_allclose(logits, EXPECTED[key], rtol=1e-4, atol=1e-4)
  assert np.abs(EXPECTED[key]).max() > 0.1  # not a trivial agreement


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_big_vision_checkpoints_give_big_vision_logits(pool):
  """'tok': a class token without position embedding, learned positions, one module per block;
  'gap': no class token, sine-cosine positions (no parameter), the scanned encoder, 'params/'."""
  expected = np.load(os.path.join(DATA, "vit_big_vision_expected.npz"))
  ours = "cls" if pool == "tok" else "gap"
  model, variables = _load(f"vit_big_vision_{pool}.npz", pool=ours, style="big_vision")
  assert ("class_token" in variables["params"]["backbone"]) == (pool == "tok")
  logits = model.apply(variables, expected["x"])
  np.testing.assert_allclose(logits, expected[f"{pool}_logits"], rtol=1e-4, atol=1e-4)
  with pytest.raises(
    WeightsError,
    match=r"a big_vision ViT checkpoint; the model is built as torchvision's. Fix: --config.model.vit_style=big_vision",
  ):
    _load(f"vit_big_vision_{pool}.npz", pool=ours)
  other = "gap" if pool == "tok" else "cls"
  with pytest.raises(WeightsError, match=rf"Fix: --config.model.pool={ours}"):
    _load(f"vit_big_vision_{pool}.npz", pool=other, style="big_vision")


def test_a_gap_model_takes_the_final_patch_tokens_of_a_class_token_checkpoint():
  model, variables = _load("vit_torchvision.pth", pool="gap")
  a = model.apply(variables, EXPECTED["x"], method="features")
  np.testing.assert_allclose(a, EXPECTED["torchvision_final_tokens"], rtol=1e-4, atol=1e-4)


def test_position_embeddings_resample_as_torchvision_does():
  model, variables = _load("vit_torchvision.pth", size=32)
  pos = variables["params"]["backbone"]["encoder"]["pos_embedding"]
  np.testing.assert_allclose(pos, EXPECTED["pos_embedding_32"], rtol=1e-5, atol=1e-6)
  logits = model.apply(variables, EXPECTED["x32"])
  np.testing.assert_allclose(logits, EXPECTED["torchvision_logits_32"], rtol=1e-4, atol=1e-4)
  same = vit_weights.resample_positions(np.asarray(pos), (8, 8))
  np.testing.assert_allclose(same, pos, rtol=1e-6, atol=1e-7)  # to its own size: unchanged


@pytest.mark.parametrize(
  "change,match",
  [
    (
      dict(width=32),
      r"vit_torchvision.pth: a torchvision ViT of width 16 and 2 blocks; vit_test has width 32",
    ),
    (
      dict(depth=3),
      r"width 16 and 2 blocks; vit_test has width 16 and 3 blocks. Fix: --config.model.name=",
    ),
  ],
)
def test_a_checkpoint_of_another_size_is_refused(change, match):
  with pytest.raises(WeightsError, match=match):
    _load("vit_torchvision.pth", **change)


def test_another_patch_size_and_foreign_parts_are_refused(tmp_path):
  state = torchvision.read_state_dict(os.path.join(DATA, "vit_torchvision.pth"))
  model = Classifier(vit.ViT(8, 16, 2, 2, 32, pool="cls"))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(
    WeightsError,
    match=r"conv_proj.weight \(converted \(4, 4, 3, 16\)\) does not fit .* Fix: --config.model.patch_size=4",
  ):
    torchvision.load_torchvision_state_dict(dict(state), NAME, variables)
  model = Classifier(vit.ViT(4, 16, 2, 2, 32, pool="cls"))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  extra = dict(state, **{"heads.pre_logits.weight": np.zeros((16, 16), np.float32)})
  with pytest.raises(
    WeightsError, match=r"keys of parts our ViT does not build: heads.pre_logits.weight"
  ):
    torchvision.load_torchvision_state_dict(extra, NAME, variables)


def test_a_run_checks_the_file_before_anything_else():
  from configs import iris_pad

  from divisive_jax import sharding, state

  config = iris_pad.get_config("quick,vit_tiny")
  config.model.pretrained_path = os.path.join(DATA, "vit_torchvision.pth")
  mesh = sharding.make_mesh(jax.devices()[:1])
  with pytest.raises(
    WeightsError, match=r"width 16 and 2 blocks; vit_tiny has width 64 and 4 blocks"
  ):
    state.read_pretrained(config, mesh)


def test_a_file_missing_a_part_names_it():
  state = dict(torchvision.read_state_dict(os.path.join(DATA, "vit_torchvision.pth")))
  del state["conv_proj.bias"]
  model = Classifier(vit.ViT(4, 16, 2, 2, 32, pool="cls"))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(
    WeightsError, match=r"nothing for our backbone/conv_proj/bias in this torchvision ViT"
  ):
    torchvision.load_torchvision_state_dict(state, NAME, variables)

"""Our ResNet-18/50 and DenseNet-121 compute what torchvision's do, given the same weights.

Needs torch + torchvision (optional dependencies); skipped without them. torch only makes the
reference models and writes their weights: the files are read back by the torch-free
`read_state_dict`, which must give torch's own values exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from divisive_jax.models import get_model
from divisive_jax.models.torchvision import (
  WeightsError,
  load_torchvision_state_dict,
  read_state_dict,
)

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def torch_model(name, num_classes, seed=0):
  """A random torchvision model in eval mode with non-trivial BN affine parameters and running
  statistics (averages over a calibration batch, then perturbed by about 10%)."""
  torch.manual_seed(seed)
  net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.uniform_(-0.2, 0.2)
      bn.momentum = None  # running stats = plain average over the calibration batches
    net.train()(to_torch(images(seed=seed + 1, n=4)))
    for bn in bns:
      std = bn.running_var.sqrt()
      bn.running_mean.add_(0.1 * std * torch.randn_like(std))
      bn.running_var.mul_(torch.empty_like(std).uniform_(0.8, 1.25))
  return net.eval()


def torch_features(net, name, x):
  """torchvision's last feature map before pooling, NHWC."""
  if name.startswith("densenet"):
    a = torch.relu(net.features(x))
  else:
    a = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    a = net.layer4(net.layer3(net.layer2(net.layer1(a))))
  return a.permute(0, 2, 3, 1).numpy()


def images(seed=0, n=2, size=64):
  """Random images in [0, 1], NHWC, the input our models normalise themselves."""
  return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


def to_torch(x):
  """NHWC images in [0, 1] -> the ImageNet-normalised NCHW tensor torchvision expects."""
  return torch.from_numpy(((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).copy())


def run_torch(net, name, x):
  with torch.no_grad():
    xt = to_torch(x)
    return torch_features(net, name, xt), net(xt).numpy()


@functools.partial(jax.jit, static_argnums=0)
def features_and_logits(model, variables, x):
  """A and head(A) in evaluation mode."""
  A = model.apply(variables, x, method="features")
  return A, model.apply(variables, A, method="head")


def assert_close_to_scale(A, A_torch, tol=1e-4):
  """|A - A_torch| <= tol * max|A_torch|: deep float32 feature maps of magnitude ~10 differ by
  ~1e-3 between any two float32 implementations (both are that far from a float64 run)."""
  np.testing.assert_allclose(A, A_torch, atol=tol * np.abs(A_torch).max(), rtol=0)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet121"])
def test_logits_match_torchvision(name, tmp_path):
  net = torch_model(name, num_classes=2)
  path = tmp_path / f"{name}.pth"
  torch.save(net.state_dict(), path)
  state = read_state_dict(path)  # no torch involved
  assert list(state) == list(net.state_dict())
  for key, value in net.state_dict().items():
    np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)
    assert state[key].dtype == value.numpy().dtype, key
  config = ConfigDict({"name": name, "num_outputs": 2})
  model = get_model(config)
  x = images()
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x))
  variables = load_torchvision_state_dict(str(path), config, abstract)

  A, logits = features_and_logits(model, variables, x)
  A_torch, logits_torch = run_torch(net, name, x)
  print(
    f"\n{name}: max|logits - torch| {np.abs(logits - logits_torch).max():.2e} "
    f"(max|logits| {np.abs(logits_torch).max():.2f}), max|A - torch| "
    f"{np.abs(A - A_torch).max():.2e} (max|A| {np.abs(A_torch).max():.2f})"
  )
  np.testing.assert_allclose(logits, logits_torch, atol=1e-4, rtol=0)
  assert_close_to_scale(A, A_torch)


def test_imagenet_head_is_kept():
  net = torch_model("resnet18", num_classes=1000)
  config = ConfigDict({"name": "resnet18", "num_outputs": 2})
  model = get_model(config)
  x = images()
  variables = model.init(jax.random.key(0), jnp.asarray(x))
  loaded = load_torchvision_state_dict(net.state_dict(), config, variables)

  head = variables["params"]["head"]
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["head"], head)
  A_torch, _ = run_torch(net, "resnet18", x)
  assert_close_to_scale(features_and_logits(model, loaded, x)[0], A_torch)


def test_densenet_legacy_keys():
  state = torch_model("densenet121", num_classes=2).state_dict()
  legacy = {
    k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()
  }
  assert any(".norm.1." in k for k in legacy)
  config = ConfigDict({"name": "densenet121"})
  abstract = jax.eval_shape(get_model(config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  new, old = (load_torchvision_state_dict(s, config, abstract) for s in (state, legacy))
  jax.tree.map(np.testing.assert_array_equal, new, old)


def test_wrong_model_name_is_reported():
  state = torch_model("resnet18", num_classes=2).state_dict()
  config = ConfigDict({"name": "resnet50"})
  abstract = jax.eval_shape(get_model(config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(WeightsError, match="model.name"):
    load_torchvision_state_dict(state, config, abstract)


def test_small_stem_shape_mismatch_names_key_and_fix():
  state = torch_model("resnet18", num_classes=2).state_dict()
  config = ConfigDict({"name": "resnet18", "stem": "small"})
  abstract = jax.eval_shape(get_model(config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(WeightsError, match=r"conv1\.weight.*\(64, 3, 7, 7\).*stem='imagenet'"):
    load_torchvision_state_dict(state, config, abstract)


def test_whole_pickled_torchvision_model_is_refused(tmp_path):
  path = tmp_path / "resnet18_model.pth"
  torch.save(torchvision.models.resnet18(weights=None), path)
  with pytest.raises(WeightsError, match=r"whole pickled model .*torchvision\.models\.resnet"):
    read_state_dict(path)

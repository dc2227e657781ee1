"""The model zoo contract (see ARCHITECTURE.md, "Models"), on small inputs and narrow widths.

Shapes are checked with `jax.eval_shape` (tracing only); numerics use `random_variables`, which
fills the abstract variables with NumPy draws instead of compiling `model.init`.
"""

import functools
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from divisive_jax.models import get_model
from divisive_jax.models.torchvision import load_torchvision_state_dict

NAMES = ("tiny", "resnet18", "resnet50", "densenet121")
# Narrow widths, and the feature channels they give: 4w (tiny), 8w (resnet18), 32w (resnet50);
# densenet121 at width 8 (growth 4): ((((8 + 6*4)//2 + 12*4)//2 + 24*4)//2 + 16*4) = 128.
NARROW = {"tiny": (8, 32), "resnet18": (8, 64), "resnet50": (4, 128), "densenet121": (8, 128)}


def config(name, **fields):
  return ConfigDict({"name": name, "width": NARROW[name][0], **fields})


def images(n=2, size=32, channels=3, seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).uniform(size=(n, size, size, channels)), jnp.float32
  )


def random_variables(model, x, seed=0):
  """Variables shaped like ``model.init``'s: conv/dense kernels N(0, 1/fan_in), BN scale and
  running variance U(0.5, 1.5), biases and running means N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, size=shape)
    return 0.1 * rng.normal(size=shape)

  return jax.tree_util.tree_map_with_path(lambda p, l: jnp.asarray(draw(p, l), l.dtype), abstract)


def abstract_outputs(model, x):
  """Shapes of (variables, A, logits via head, logits via __call__), without computing."""
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  A = jax.eval_shape(functools.partial(model.apply, method="features"), variables, x)
  logits = jax.eval_shape(
    functools.partial(model.apply, method="head"), {"params": variables["params"]}, A
  )
  return variables, A, logits, jax.eval_shape(model.apply, variables, x)


@pytest.mark.parametrize("num_outputs", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_output_shapes(name, num_outputs):
  model = get_model(config(name, num_outputs=num_outputs))
  variables, A, logits, call = abstract_outputs(model, images())
  channels = NARROW[name][1]
  grid = 2 if name == "tiny" else 1  # 32 px, 'imagenet' stem: /16 for tiny, /32 otherwise
  assert set(variables) == {"params", "batch_stats"}
  assert (A.shape, A.dtype) == ((2, grid, grid, channels), jnp.float32)
  assert variables["params"]["head"]["kernel"].shape == (channels, num_outputs)
  assert variables["params"]["head"]["bias"].shape == (num_outputs,)
  assert (logits.shape, logits.dtype) == (call.shape, call.dtype) == ((2, num_outputs), jnp.float32)


@pytest.mark.parametrize(
  "name, stem, size, grid",
  [
    ("resnet18", "imagenet", 224, 7),
    ("resnet50", "imagenet", 224, 7),
    ("densenet121", "imagenet", 224, 7),
    ("tiny", "imagenet", 224, 14),
    ("resnet18", "small", 28, 4),
    ("densenet121", "small", 28, 3),
    ("tiny", "small", 28, 7),
  ],
)
def test_feature_grid(name, stem, size, grid):
  """Default widths (64; tiny 16): 224 px -> 7x7; 'small' stem (1-channel input, as in
  Viviano et al.) for resnet18: 28 -> 28, 14, 7, 4."""
  model = get_model(SimpleNamespace(name=name, stem=stem))
  channels_in = 1 if stem == "small" else 3
  _, A, _, _ = abstract_outputs(model, jnp.zeros((1, size, size, channels_in)))
  channels = {"resnet18": 512, "resnet50": 2048, "densenet121": 1024, "tiny": 64}[name]
  assert A.shape == (1, grid, grid, channels)


@pytest.mark.parametrize("name", NAMES)
def test_call_is_head_of_features(name):
  model, x = get_model(config(name)), images()
  variables = random_variables(model, x)

  @jax.jit
  def both(variables, x):
    A = model.apply(variables, x, method="features")
    return model.apply({"params": variables["params"]}, A, method="head"), model.apply(variables, x)

  via_features, via_call = both(variables, x)
  assert np.all(np.isfinite(via_call)) and np.std(via_call) > 0
  np.testing.assert_allclose(via_features, via_call, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  model = get_model(config("tiny", stem="small"))
  x = images(n=4, size=16)
  return model, jax.jit(model.init)(jax.random.key(0), x), x


def test_init_like_torchvision(tiny):
  """Conv kernels N(0, 2 / fan_out) untruncated, BN scale 1 / bias 0, running stats 0 / 1."""
  _, variables, _ = tiny
  kernel = np.asarray(variables["params"]["backbone"]["layer3_0"]["conv2"]["kernel"])
  fan_out = np.prod(kernel.shape[:2]) * kernel.shape[3]
  assert abs(kernel.std() / np.sqrt(2 / fan_out) - 1) < 0.05
  assert np.abs(kernel).max() > 2.5 * kernel.std()  # not truncated at 2 sigma
  bn = variables["params"]["backbone"]["bn1"]
  np.testing.assert_array_equal(bn["scale"], 1)
  np.testing.assert_array_equal(bn["bias"], 0)
  stats = variables["batch_stats"]["backbone"]["bn1"]
  np.testing.assert_array_equal(stats["mean"], 0)
  np.testing.assert_array_equal(stats["var"], 1)


def test_batch_stats_update_only_in_training(tiny):
  model, variables, x = tiny
  _, updated = model.apply(variables, x, train=True, method="features", mutable=["batch_stats"])
  _, frozen = model.apply(variables, x, train=False, method="features", mutable=["batch_stats"])
  changed = jax.tree.map(
    lambda a, b: bool(np.any(a != b)), variables["batch_stats"], updated["batch_stats"]
  )
  assert all(jax.tree.leaves(changed))
  jax.tree.map(np.testing.assert_array_equal, frozen["batch_stats"], variables["batch_stats"])


def test_batch_stats_momentum(tiny):
  """torchvision's momentum 0.1: ra = 0.9 * ra + 0.1 * batch statistic (biased variance)."""
  model, variables, x = tiny
  _, state = model.apply(
    variables,
    x,
    train=True,
    method="features",
    capture_intermediates=True,
    mutable=["batch_stats", "intermediates"],
  )
  conv1 = state["intermediates"]["backbone"]["conv1"]["__call__"][0]
  stats = state["batch_stats"]["backbone"]["bn1"]
  np.testing.assert_allclose(stats["mean"], 0.1 * conv1.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv1.var((0, 1, 2)), rtol=1e-4)


def test_bfloat16_compute(tiny):
  model, variables, x = tiny
  model16 = get_model(config("tiny", stem="small", dtype="bfloat16"))
  abstract16 = jax.eval_shape(model16.init, jax.random.key(0), x)
  assert jax.tree.map(lambda l: l.dtype, abstract16) == jax.tree.map(lambda l: l.dtype, variables)
  A16 = model16.apply(variables, x, method="features")
  A32 = model.apply(variables, x, method="features")
  assert A16.dtype == jnp.float32
  np.testing.assert_allclose(A16, A32, atol=0.05 * np.abs(A32).max())


def test_input_normalisation():
  """features(x) normalises with (x - mean) / std inside; 1-channel default is 0.5 / 0.5."""
  gray = get_model(config("tiny"))
  explicit = get_model(config("tiny", input_mean=(0.25,), input_std=(2.0,)))
  x = images(channels=1)
  variables = random_variables(gray, x)
  A_gray = gray.apply(variables, x, method="features")
  A_explicit = explicit.apply(variables, (x - 0.5) / 0.5 * 2.0 + 0.25, method="features")
  np.testing.assert_allclose(A_gray, A_explicit, rtol=1e-5, atol=1e-5)


def test_synced_batchnorm_matches_full_batch(tiny):
  """Under shard_map over 2 devices, BN with bn_axis_name='data' uses global batch statistics."""
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py sets 4 host devices)")
  model, variables, x = tiny
  synced = get_model(config("tiny", stem="small"), bn_axis_name="data")

  def train_features(model, variables, x):
    A, state = model.apply(variables, x, train=True, method="features", mutable=["batch_stats"])
    return A, state["batch_stats"]

  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  sharded = jax.jit(
    jax.shard_map(
      functools.partial(train_features, synced),
      mesh=mesh,
      in_specs=(P(), P("data")),
      out_specs=(P("data"), P()),
    )
  )
  A_full, stats_full = train_features(model, variables, x)
  A_sharded, stats_sharded = sharded(variables, jax.device_put(x, NamedSharding(mesh, P("data"))))
  np.testing.assert_allclose(A_sharded, A_full, rtol=1e-5, atol=1e-5)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), stats_sharded, stats_full
  )


def test_defaults_from_a_minimal_config():
  model = get_model(SimpleNamespace(name="tiny"))
  _, A, logits, _ = abstract_outputs(model, jnp.zeros((1, 64, 64, 3)))
  assert A.shape == (1, 4, 4, 64) and logits.shape == (1, 2)


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("name", "vgg16", r"valid names: \['densenet121', 'resnet18', 'resnet50', 'tiny', 'vit_b16',"),
    ("stem", "cifar", "valid stems"),
    ("dtype", "float16", "valid dtypes"),
  ],
)
def test_invalid_config(field, value, match):
  with pytest.raises(ValueError, match=match):
    get_model(ConfigDict({"name": "tiny", field: value}))


def torchvision_keys(variables, name):
  """Our variables as a torchvision-style state dict (NumPy), the inverse of the import."""
  head, prefix = ("fc", "") if name.startswith("resnet") else ("classifier", "features.")
  leaves = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
  }
  state = {}
  for col in ("params", "batch_stats"):
    for path, value in jax.tree_util.tree_flatten_with_path(variables[col])[0]:
      *module, leaf = (k.key for k in path)
      module = head if module == ["head"] else prefix + ".".join(module[1:])
      value = np.asarray(value)
      if leaf == "kernel":
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      module = re.sub(r"_(\d+)", r".\1", module)  # layer1_0 -> layer1.0
      state[f"{module}.{leaves[leaf]}"] = value
  return state


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_torchvision_import_roundtrip(name):
  """Loading our own variables written in torchvision's layout gives them back (no torch)."""
  cfg, x = config(name), images()
  model = get_model(cfg)
  variables = random_variables(model, x)
  state = torchvision_keys(variables, name)
  assert ("layer2.0.downsample.1.running_var" in state) == (name == "resnet18")
  state["layer1.0.bn1.num_batches_tracked"] = np.array(3)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  loaded = load_torchvision_state_dict(state, cfg, abstract)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)

  state["extra.weight"] = np.zeros(3)
  with pytest.raises(ValueError, match=r"unexpected keys \[extra\.weight\]"):
    load_torchvision_state_dict(state, cfg, abstract)


def test_torchvision_import_keeps_a_head_of_another_size():
  cfg, x = config("resnet18"), images()
  model = get_model(cfg)
  variables = random_variables(model, x)
  state = torchvision_keys(
    random_variables(get_model(config("resnet18", num_outputs=1)), x, 1), "resnet18"
  )
  loaded = load_torchvision_state_dict(state, cfg, variables)
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["head"], variables["params"]["head"])
  np.testing.assert_array_equal(
    loaded["params"]["backbone"]["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0)
  )


@pytest.mark.parametrize("stride,size", [(1, 6), (2, 7), (2, 8)])
def test_conv1x1_is_the_convolution_as_a_dot_product(stride, size):
  """`CpuConv` at 1x1 (a strided slice, then x @ W) equals flax's 1x1 convolution with torchvision's
  padding 0, outputs and both gradients (odd sizes: the rows a strided convolution reads)."""
  import flax.linen as nn

  from divisive_jax.models.resnet import KAIMING_FAN_OUT, CpuConv

  x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
  dot = CpuConv(3, 1, stride)
  conv = nn.Conv(
    3, (1, 1), strides=stride, padding=((0, 0), (0, 0)), use_bias=False, kernel_init=KAIMING_FAN_OUT
  )
  params = dot.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, conv.init(jax.random.key(1), x))
  for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(conv.init(jax.random.key(1), x))):
    np.testing.assert_array_equal(p, q)  # the same parameter, initialised alike
  y, vjp_dot = jax.vjp(lambda p, x: dot.apply(p, x), params, x)
  y_conv, vjp_conv = jax.vjp(lambda p, x: conv.apply(p, x), params, x)
  assert y.shape == y_conv.shape == (2, -(-size // stride), -(-size // stride), 3)
  np.testing.assert_allclose(y, y_conv, rtol=1e-5, atol=1e-6)
  cot = jax.random.normal(jax.random.key(2), y.shape)
  for a, b in zip(jax.tree.leaves(vjp_dot(cot)), jax.tree.leaves(vjp_conv(cot))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # A dot product on CPU only: lowered for GPU or TPU it is the convolution, forward and both
  # gradients (XLA's GPU compiler of jax 0.10.2 aborts on the dot's strided weight gradient).
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(dot.apply(p, x))), argnums=(0, 1)))
  for platform, (convs, dots) in (("cpu", (0, 3)), ("cuda", (3, 0)), ("tpu", (3, 0))):
    text = jax.export.export(grad, platforms=[platform])(params, x).mlir_module()
    assert text.count("stablehlo.convolution") == convs, platform
    assert text.count("stablehlo.dot_general") == dots, platform


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 9), (3, 2, 9), (7, 2, 10)])
def test_the_patch_weight_gradient_is_the_convolutions(kernel, stride, size):
  """`CpuConv` at k x k (on CPU: XLA's convolution, whose weight gradient is patches^T @ g) equals
  flax's convolution in float64: the same parameter, outputs, first-order gradients and the
  second-order ones of RRR's input-gradient penalty; and it changes only the CPU program: lowered
  for GPU or TPU, the weight gradient is the convolution, with no matrix product."""
  import re

  from divisive_jax.models import resnet

  assert resnet.conv(256, 3, name="c").min_input == 0
  assert resnet.conv(64, 3, name="c").min_input == resnet.PATCH_GRAD_MIN_INPUT  # large inputs
  assert not isinstance(resnet.conv(32, 3, name="c"), resnet.CpuConv)  # narrow: no gain
  assert not isinstance(resnet.conv(256, 3, name="c", patch_grad=False), resnet.CpuConv)

  def make(patch_grad):
    if patch_grad:
      return resnet.CpuConv(5, kernel, stride, jnp.float64, jnp.float64)
    return resnet.conv(5, kernel, stride, name="c", dtype=jnp.float64, patch_grad=False)

  def loss(model, v, x):
    return jnp.sum(jnp.sin(model.apply(v, x)))

  def input_gradient_penalty(model, v, x):
    return jnp.sum(jax.grad(loss, argnums=2)(model, v, x) ** 2)

  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3), jnp.float64)
    patch, plain = make(True), make(False)
    v = patch.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, v, plain.init(jax.random.key(1), x))
    np.testing.assert_allclose(patch.apply(v, x), plain.apply(v, x), rtol=1e-12)
    for f in (loss, input_gradient_penalty):
      ours, ref = (jax.grad(functools.partial(f, m), argnums=(0, 1))(v, x) for m in (patch, plain))
      for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    for platform, ops in (
      ("cpu", {"convolution": 1, "dot_general": 1}),
      ("cuda", None),
      ("tpu", None),
    ):
      counts = []
      for m in (patch, plain):
        grad = jax.jit(jax.grad(functools.partial(loss, m)))
        text = jax.export.export(grad, platforms=[platform])(v, x).mlir_module()
        counts.append(
          {
            op: len(re.findall(rf"stablehlo\.{op}\b", text))
            for op in ("convolution", "dot_general")
          }
        )
      assert counts[1] == {"convolution": 2, "dot_general": 0}  # forward and weight gradient
      assert counts[0] == (ops or counts[1]), platform
    # An input below ``min_input``: XLA's convolution alone, on CPU too.
    small = resnet.CpuConv(5, kernel, stride, jnp.float64, jnp.float64, min_input=x.size + 1)
    text = jax.export.export(jax.jit(jax.grad(functools.partial(loss, small))), platforms=["cpu"])
    text = text(v, x).mlir_module()
    assert "dot_general" not in text and len(re.findall(r"stablehlo\.convolution\b", text)) == 2


@pytest.mark.parametrize("name", ["bottleneck_resnet", "densenet"])
def test_backbones_with_1x1_dots_equal_the_convolutions(name):
  """The backbones' 1x1 convolutions as dot products (the default) against flax's convolutions
  (``dot_1x1=False``), on short versions of ResNet-50 (bottlenecks, strided downsamples) and
  DenseNet-121 (bottlenecks, a transition): the same parameter tree and initial values, the same
  outputs and training-mode gradients (float64: the two differ by rounding only, which float32
  BatchNorm over a small batch amplifies)."""
  from divisive_jax.models import densenet, resnet

  make = {
    "bottleneck_resnet": functools.partial(resnet.ResNet, (1, 1), bottleneck=True, width=4),
    "densenet": functools.partial(densenet.DenseNet, (2, 2), width=8),
  }[name]
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3), jnp.float64)
    dot, conv = (make(dtype=jnp.float64, dot_1x1=d) for d in (True, False))
    variables = dot.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, variables, conv.init(jax.random.key(0), x))

    def loss(model, v):
      out, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(out))

    apply = lambda m: jax.jit(m.apply)(variables, x)  # jitted: one program, not op by op
    np.testing.assert_allclose(apply(dot), apply(conv), rtol=1e-10)
    grads = [jax.jit(jax.grad(functools.partial(loss, m)))(variables) for m in (dot, conv)]
    for a, b in zip(*(jax.tree.leaves(g["params"]) for g in grads)):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(b).max())


@pytest.mark.parametrize("bn_group", [2, 0])
def test_batchnorm_statistics_over_groups_of_devices(bn_group):
  """`sharding.make_mesh(devices, g)`: BatchNorm over `BN_AXIS` inside the step's shard_map
  normalises each group of g consecutive devices' rows with that group's statistics (0: all
  devices: the whole batch's), and a group that does not divide the devices is refused."""
  from jax.sharding import PartitionSpec as P

  from divisive_jax import sharding
  from divisive_jax.models.resnet import batch_norm

  with jax.enable_x64(True):
    devices = jax.devices()[:4]
    mesh = sharding.make_mesh(devices, bn_group)
    assert mesh.shape == {"bn_groups": 2 if bn_group else 1, "data": bn_group or 4}
    x = jax.random.normal(jax.random.key(0), (8, 3, 3, 5), jnp.float64) * 3 + 1
    alone = batch_norm(True, None, jnp.float64)()  # statistics of the rows it is given
    grouped = batch_norm(True, sharding.BN_AXIS, jnp.float64)()
    variables = alone.init(jax.random.key(1), x)

    def apply(v, x):
      return grouped.apply(v, x, mutable=["batch_stats"])[0]

    y = jax.jit(
      jax.shard_map(apply, mesh=mesh, in_specs=(P(), P(sharding.AXIS)), out_specs=P(sharding.AXIS))
    )(variables, x)
    rows = 4 if bn_group else 8  # 2 rows per device
    for start in range(0, 8, rows):
      ref = alone.apply(variables, x[start : start + rows], mutable=["batch_stats"])[0]
      np.testing.assert_allclose(y[start : start + rows], ref, rtol=1e-12, atol=1e-12)
  with pytest.raises(ValueError, match=r"bn_group=3 must divide the number of devices \(4\)"):
    sharding.make_mesh(devices, 3)

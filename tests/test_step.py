"""The jitted shard_map steps: 1 device == 4 devices, compile once, donation, eval padding.

Comparisons of two ways of computing the same steps run in float64 (jax's x64 mode): the float32
summation order of 1 vs 4 devices differs by rounding (~1e-7) that the CAM losses' per-sample
min/max normalisation amplifies (a near-constant map divided by its tiny range), to 1e-5 and
more; in float64 the same amplification leaves ~1e-8 (measured with XLA's backend at -O1, whose
code differs between the two programs as another CPU's would), while a real difference (another
batch, a missing reduction) stays at ~1e-3. The bound: 1e-6 relative.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import EVERY_TERM, step_batch

from divisive_jax import losses, models, sharding, step
from divisive_jax.state import TrainState, loss_weights

N, S = 8, 16


def _setup(num_devices, weights, num_outputs=2, dtype="float32"):
  cfg = ml_collections.ConfigDict(
    dict(name="tiny", width=8, stem="small", num_outputs=num_outputs, dtype=dtype)
  )
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  model = models.get_model(cfg, bn_axis_name=sharding.AXIS)
  variables = models.get_model(cfg).init(jax.random.key(0), jnp.zeros((1, S, S, 1)), train=False)
  tx = optax.sgd(0.05, momentum=0.9)
  loss_cfg = losses.LossConfig(weights=losses.parse_weights(weights))
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    opt_state=tx.init(variables["params"]),
    rng=jax.random.key_data(jax.random.key(1)),
    loss_weights=loss_weights(loss_cfg),
  )
  state = jax.device_put(state, sharding.replicated(mesh))
  return mesh, model, state, step.make_train_step(model, loss_cfg, tx, mesh), loss_cfg


def _train(num_devices, weights, steps=3, num_outputs=2):
  """``steps`` float64 steps on ``num_devices`` devices (x64 mode)."""
  with jax.enable_x64(True):
    mesh, _, state, train_step, _ = _setup(num_devices, weights, num_outputs, "float64")
    for i in range(steps):
      state, metrics = train_step(state, sharding.to_global(step_batch(i), mesh))
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize(
  "weights,num_outputs",
  [
    # Every term of a 2-logit head in one program (each term's value is compared on its own
    # below, as loss/<term>), and the 1-logit head with CYBORG.
    ({k: v for k, v in EVERY_TERM.items() if k != "cyborg"}, 2),
    ({"ce": 0.5, "cyborg": 0.5}, 1),
  ],
)
def test_one_device_equals_four_devices(weights, num_outputs):
  s1, m1 = _train(1, weights, num_outputs=num_outputs)
  s4, m4 = _train(4, weights, num_outputs=num_outputs)
  leaves1 = jax.tree.leaves((s1.params, s1.batch_stats))
  assert {x.dtype for x in leaves1} == {np.dtype("float64")}
  for a, b in zip(leaves1, jax.tree.leaves((s4.params, s4.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  for k in m1:
    assert m1[k] == pytest.approx(m4[k], rel=1e-6, abs=1e-9), k
  assert int(s1.step) == 3 and m1["finite"] == 1.0


def test_compiles_once_and_donates_state():
  mesh, _, state, train_step, _ = _setup(4, {"ce": 0.5, "difference": 0.5})
  first = jax.tree.leaves(state.params)[0]
  for i in range(3):
    state, _ = train_step(state, sharding.to_global(step_batch(i), mesh))
  assert first.is_deleted()  # donated
  assert train_step._cache_size() == 1


def test_training_reduces_the_loss():
  mesh, _, state, train_step, _ = _setup(2, {"ce": 0.5, "opposition": 0.5})
  batch = sharding.to_global(step_batch(0), mesh)
  losses_seen = []
  for _ in range(15):
    state, m = train_step(state, batch)
    losses_seen.append(float(m["loss"]))
  assert losses_seen[-1] < 0.7 * losses_seen[0]


def test_eval_step_outputs_and_padding():
  mesh, model, state, _, loss_cfg = _setup(4, {"ce": 1.0})
  b = step_batch(0)
  b["valid"][-3:] = 0.0
  out = step.make_eval_step(model, mesh)(state, sharding.to_global(b, mesh))
  out = {k: np.asarray(v) for k, v in out.items()}
  assert out["maps"].shape == (N, 2, S // 4, S // 4)  # tiny: strides 1, 2, 2
  np.testing.assert_array_equal(out["valid"], b["valid"])
  np.testing.assert_allclose(out["score"], jax.nn.softmax(out["logits"])[:, 1], rtol=1e-6)
  assert np.all((out["pred"] == 0) | (out["pred"] == 1))


def _resident_setup(num_devices, inputs, dtype="float32"):
  from divisive_jax.preprocess import InputConfig  # noqa: F401 (documents the argument type)

  mesh, model, state, _, loss_cfg = _setup(num_devices, {"ce": 0.5, "difference": 0.5}, 2, dtype)
  tx = optax.sgd(0.05, momentum=0.9)
  rng = np.random.default_rng(0)
  n = 24
  data = {
    "image": rng.integers(0, 256, (n, S, S, 1), dtype=np.uint8),
    "saliency": np.zeros((n, S, S), np.uint8),
    "label": (np.arange(n) % 2).astype(np.int32),
    "has_saliency": np.ones(n, np.float32),
  }
  data["saliency"][:, 4:12, 3:9] = 255
  single = step.make_train_step(model, loss_cfg, tx, mesh, inputs)
  multi = step.make_train_step(model, loss_cfg, tx, mesh, inputs, resident=True)
  return mesh, state, data, single, multi


def test_k_steps_per_dispatch_equal_k_single_steps():
  """The device-resident path (k steps per dispatch with lax.scan, batches gathered on the
  device by index, augmentation on the device) gives the parameters of k single steps fed the
  same batches from the host."""
  from divisive_jax.data import pipeline
  from divisive_jax.preprocess import InputConfig

  inputs = InputConfig(channels=1, flip=True, crop=2)
  with jax.enable_x64(True):
    _k_steps_equal_k_single_steps(inputs, pipeline)


def _k_steps_equal_k_single_steps(inputs, pipeline):
  mesh, state, data, single, multi = _resident_setup(4, inputs, "float64")
  b, k, seed = 8, 3, 5
  rep = sharding.replicated(mesh)
  resident = {key: jax.device_put(v, rep) for key, v in data.items()}
  idx_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.AXIS))

  s_multi = jax.device_put(jax.tree.map(jnp.copy, state), rep)
  losses_multi = []
  for first in (0, k):
    idx = np.stack([pipeline.batch_indices(24, b, seed, t) for t in range(first, first + k)])
    s_multi, m = multi(s_multi, resident, jax.device_put(idx.astype(np.int32), idx_sharding))
    losses_multi += list(np.asarray(m["loss"]))
  s_single, losses_single = state, []
  for t in range(2 * k):
    rows = pipeline.batch_indices(24, b, seed, t)
    batch = {key: v[rows] for key, v in data.items()}
    batch["valid"] = np.ones(b, np.float32)
    s_single, m = single(s_single, sharding.to_global(batch, mesh))
    losses_single.append(float(m["loss"]))
  assert int(s_multi.step) == int(s_single.step) == 2 * k
  np.testing.assert_allclose(losses_multi, losses_single, rtol=1e-6)
  for a, c in zip(jax.tree.leaves(s_multi.params), jax.tree.leaves(s_single.params)):
    assert a.dtype == np.float64
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-9)
  assert multi._cache_size() == 1


def test_bfloat16_trains_and_agrees_with_float32():
  """bf16 compute (params, CAMs and losses in float32): finite, learning, and within a stated
  tolerance of float32 from the same initialisation and batches. bf16 keeps 8 significant bits
  (relative rounding 2^-8 = 0.4% per operation); after 20 steps the two trajectories have
  drifted by a few rounding steps: every step's loss within 5% of float32's (measured on a
  2-core CPU: at most 2.3%), the first one within 1%."""
  import sys

  sys.path.insert(0, "tests")
  from helpers import load_config

  from divisive_jax import preprocess, state
  from divisive_jax.data import load_splits, pipeline

  runs = {}
  for dtype in ("float32", "bfloat16"):
    c = load_config(
      "iris_pad",
      "quick",
      model__dtype=dtype,
      data__image_size=32,
      model__width=8,
      batch_size=16,
      data__num_train=64,
      data__num_val=8,
      data__num_test=8,
    )
    splits = load_splits(c.data, "")
    setup = state.build(c, 4, 40)
    batches = pipeline.train_batches(splits.train, 16, seed=0)
    train_step = step.make_train_step(
      setup.model, setup.loss_cfg, setup.tx, setup.mesh, preprocess.from_config(c.data)
    )
    s, losses_seen = state.create_state(setup, 0), []
    for _ in range(20):
      s, m = train_step(s, sharding.to_global(next(batches), setup.mesh))
      losses_seen.append(float(m["loss"]))
      assert m["finite"] == 1.0
    batches.close()
    runs[dtype] = np.array(losses_seen)
  f32, bf16 = runs["float32"], runs["bfloat16"]
  assert bf16[-5:].mean() < 0.75 * bf16[0]  # it learns
  assert abs(bf16[0] - f32[0]) <= 0.01 * f32[0]
  np.testing.assert_allclose(bf16, f32, rtol=0.05)


def test_gradcampp_trains():
  """Grad-CAM++ as the CAM kind of a CAM loss: one compilation, finite, learning."""
  mesh, model, state, _, _ = _setup(2, {"ce": 0.5, "difference": 0.5})
  cfg = losses.LossConfig(
    weights=losses.parse_weights({"ce": 0.5, "difference": 0.5}), cam_kind="gradcampp"
  )
  train_step = step.make_train_step(model, cfg, optax.sgd(0.05, momentum=0.9), mesh)
  batch = sharding.to_global(step_batch(0), mesh)
  seen = []
  for _ in range(10):
    state, m = train_step(state, batch)
    assert m["finite"] == 1.0
    seen.append(float(m["loss"]))
  assert seen[-1] < seen[0]


def _conv_count(compiled) -> int:
  return sum(" convolution(" in line for line in compiled.as_text().splitlines())


def test_one_member_is_the_single_run_program():
  """`make_train_step(members=1)` compiles to one run's program: the same FLOPs (XLA's cost
  analysis) and convolutions (optimized HLO) as jit(shard_map) of the per-device body written
  out by hand -- what the single-run factory was before runs and populations shared one -- with
  no member axis; two members unrolled hold twice the convolutions."""
  from jax.sharding import PartitionSpec as P

  mesh, model, state, _, cfg = _setup(2, {"ce": 0.5, "difference": 0.5})
  tx = optax.sgd(0.05, momentum=0.9)
  batch = sharding.to_global(step_batch(0), mesh)
  body = step._train_step_fn(model, cfg, tx, step.InputConfig())
  rep = sharding.replicated(mesh)
  by_hand = jax.jit(
    jax.shard_map(body, mesh=mesh, in_specs=(P(), P(sharding.AXIS)), out_specs=(P(), P())),
    in_shardings=(rep, sharding.batch_sharding(mesh)),
    out_shardings=(rep, rep),
    donate_argnums=0,
  ).lower(state, batch)
  one = step.make_train_step(model, cfg, tx, mesh, members=1).lower(state, batch)
  assert one.as_text() == by_hand.as_text()  # the same program, not merely the same cost
  compiled = [x.compile() for x in (by_hand, one)]
  flops = [c.cost_analysis()["flops"] for c in compiled]
  assert flops[0] == flops[1] > 0
  convs = [_conv_count(c) for c in compiled]
  assert convs[0] == convs[1] > 0
  pair = jax.device_put(jax.tree.map(lambda x: jnp.stack([x, x]), state), rep)
  two = step.make_train_step(model, cfg, tx, mesh, members=2, strategy="unroll")
  two = two.lower(pair, batch).compile()
  assert _conv_count(two) == 2 * convs[1]

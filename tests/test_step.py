"""The jitted shard_map steps: 1 device == 4 devices, compile once, donation, eval padding."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from divisive_jax import losses, models, step

N, S = 8, 16


def _batch(seed=0, n=N):
  rng = np.random.default_rng(seed)
  sal = np.zeros((n, S, S), np.float32)
  sal[:, 3:10, 4:12] = 1.0
  return {
    "image": rng.random((n, S, S, 1), np.float32),
    "label": (np.arange(n) % 2).astype(np.int32),
    "saliency": sal,
    "has_saliency": np.array([1, 1, 0, 1, 1, 0, 1, 1][:n], np.float32),
    "valid": np.ones(n, np.float32),
  }


def _setup(num_devices, weights, num_outputs=2):
  cfg = ml_collections.ConfigDict(dict(name="tiny", width=8, stem="small", num_outputs=num_outputs))
  mesh = step.make_mesh(jax.devices()[:num_devices])
  model = models.get_model(cfg, bn_axis_name=step.AXIS)
  variables = models.get_model(cfg).init(jax.random.key(0), jnp.zeros((1, S, S, 1)), train=False)
  tx = optax.sgd(0.05, momentum=0.9)
  state = step.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    opt_state=tx.init(variables["params"]),
    rng=jax.random.key_data(jax.random.key(1)),
  )
  state = jax.device_put(state, step.replicated(mesh))
  loss_cfg = losses.LossConfig(weights=losses.parse_weights(weights))
  return mesh, model, state, step.make_train_step(model, loss_cfg, tx, mesh), loss_cfg


def _train(num_devices, weights, steps=3, num_outputs=2):
  mesh, _, state, train_step, _ = _setup(num_devices, weights, num_outputs)
  for i in range(steps):
    state, metrics = train_step(state, step.to_global(_batch(i), mesh))
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize(
  "weights,num_outputs",
  [
    ({"ce": 0.5, "difference": 0.5, "opposition": 0.5, "margin": 0.5}, 2),
    ({"ce": 0.5, "cyborg": 0.5}, 1),
    ({"ce": 1.0, "gradmask": 0.1, "rrr": 1.0, "actdiff": 1.0}, 2),
  ],
)
def test_one_device_equals_four_devices(weights, num_outputs):
  s1, m1 = _train(1, weights, num_outputs=num_outputs)
  s4, m4 = _train(4, weights, num_outputs=num_outputs)
  for a, b in zip(
    jax.tree.leaves((s1.params, s1.batch_stats)), jax.tree.leaves((s4.params, s4.batch_stats))
  ):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  for k in m1:
    assert m1[k] == pytest.approx(m4[k], rel=1e-4, abs=1e-6), k
  assert int(s1.step) == 3 and m1["finite"] == 1.0


def test_compiles_once_and_donates_state():
  mesh, _, state, train_step, _ = _setup(4, {"ce": 0.5, "difference": 0.5})
  first = jax.tree.leaves(state.params)[0]
  for i in range(3):
    state, _ = train_step(state, step.to_global(_batch(i), mesh))
  assert first.is_deleted()  # donated
  assert train_step._cache_size() == 1


def test_training_reduces_the_loss():
  mesh, _, state, train_step, _ = _setup(2, {"ce": 0.5, "opposition": 0.5})
  batch = step.to_global(_batch(0), mesh)
  losses_seen = []
  for _ in range(15):
    state, m = train_step(state, batch)
    losses_seen.append(float(m["loss"]))
  assert losses_seen[-1] < 0.7 * losses_seen[0]


def test_eval_step_outputs_and_padding():
  mesh, model, state, _, loss_cfg = _setup(4, {"ce": 1.0})
  b = _batch(0)
  b["valid"][-3:] = 0.0
  out = step.make_eval_step(model, loss_cfg, mesh)(state, step.to_global(b, mesh))
  out = {k: np.asarray(v) for k, v in out.items()}
  assert out["maps"].shape == (N, 2, S // 4, S // 4)  # tiny: strides 1, 2, 2
  np.testing.assert_array_equal(out["valid"], b["valid"])
  np.testing.assert_allclose(out["score"], jax.nn.softmax(out["logits"])[:, 1], rtol=1e-6)
  assert np.all((out["pred"] == 0) | (out["pred"] == 1))

"""Population training: N members in one program equal N separate runs, compile once, and a
member that goes non-finite is frozen without changing the others."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY_RUN, completed_steps, final_params, load_config

from divisive_jax import members as members_lib
from divisive_jax import sharding, state, step, train
from divisive_jax.data import load_splits, pipeline
from divisive_jax.errors import ConfigError

# A population and the same runs alone compute the same maths in another float summation order
# (N members in one XLA program). The comparisons run in float64 (jax's x64 mode, model dtype
# float64): the CAM losses' min/max normalisation amplifies rounding (a near-constant map over
# its tiny range) to ~1e-5 in float32 but ~1e-8 in float64, while a real difference (another
# batch, a member's weight) is ~1e-3 (test_step's docstring has the measurements).
TINY = dict(TINY_RUN, log_every_steps=2, num_train_steps=6, eval_every_steps=3)
EXACT = dict(rtol=1e-6, atol=1e-9)  # float64 comparisons


def test_members_are_the_product_of_seeds_and_weights():
  c = load_config(
    "iris_pad", "quick,cyborg", population__seeds="0,1", population__weights="cyborg=0.1,1"
  )
  ms = members_lib.members_of(c)
  assert [m.name for m in ms] == ["s0_cyborg0.1", "s1_cyborg0.1", "s0_cyborg1", "s1_cyborg1"]
  assert ms[3].config.seed == 1 and ms[3].config.loss.weights.cyborg == 1.0
  assert ms[3].config.population.seeds == "" and ms[3].config.data.shuffle_seed == c.seed
  with pytest.raises(ValueError, match="term=v1,v2"):
    members_lib.parse_grid("rrrr=1")


def _population(weights_per_member, seeds, strategy):
  """Float64 (call it in x64 mode)."""
  c = load_config("iris_pad", "quick,cyborg", **TINY, model__dtype="float64")
  splits = load_splits(c.data, "")
  setup = state.build(c, 2, 6)
  states = []
  for seed, w in zip(seeds, weights_per_member):
    s = state.create_state(setup, seed)
    states.append(s.replace(loss_weights={k: jnp.float64(v) for k, v in w.items()}))
  stacked = step.join_members(states, sharding.replicated(setup.mesh))
  fn = step.make_train_step(
    setup.model, setup.loss_cfg, setup.tx, setup.mesh, members=len(states), strategy=strategy
  )
  batches = [next(pipeline.train_batches(splits.train, 16, seed=0, start_step=t)) for t in range(3)]
  return setup, stacked, fn, batches


@jax.enable_x64(True)
def test_one_compilation_and_a_frozen_member_leaves_the_others_unchanged():
  """Vmapped members (the per-member body and its liveness guard are the same function under
  both strategies: `test_vmap_and_unroll_agree`; the unrolled path trains the end-to-end
  population tests)."""
  strategy = "vmap"
  # Member 1's infinite weight makes its loss non-finite at the first step.
  weights = [{"ce": 0.5, "cyborg": 0.5}, {"ce": 0.5, "cyborg": np.inf}, {"ce": 0.5, "cyborg": 2.0}]
  setup, pop, fn, batches = _population(weights, [0, 1, 2], strategy)
  first = jax.tree.map(np.asarray, pop.params)
  for b in batches:
    pop, m = fn(pop, sharding.to_global(b, setup.mesh))
    assert list(np.asarray(m["finite"])) == [1.0, 0.0, 1.0]
    assert list(np.asarray(m["live"])) == [True, False, True]
  # The non-finite member is frozen at its last finite state (here: its initial parameters).
  for a, b in zip(jax.tree.leaves(pop.params), jax.tree.leaves(first)):
    np.testing.assert_array_equal(np.asarray(a)[1], b[1])
  # The others are what they are without it.
  setup2, pair, fn2, _ = _population([weights[0], weights[2]], [0, 2], strategy)
  for b in batches:
    pair, _ = fn2(pair, sharding.to_global(b, setup2.mesh))
  for a, b in zip(jax.tree.leaves(pop.params), jax.tree.leaves(pair.params)):
    np.testing.assert_allclose(np.asarray(a)[[0, 2]], np.asarray(b), **EXACT)
  # Other runtime weights, another member frozen by hand: still the one compilation.
  rep = sharding.replicated(setup.mesh)
  halved = {k: jax.device_put(np.asarray(v) * 0.5, rep) for k, v in pop.loss_weights.items()}
  pop = state.freeze(pop.replace(loss_weights=halved), [False, False, True], setup.mesh)
  before = jax.tree.map(np.asarray, pop.params)
  pop, m = fn(pop, sharding.to_global(batches[0], setup.mesh))
  assert list(np.asarray(m["live"])) == [True, False, False]
  for a, b in zip(jax.tree.leaves(pop.params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a)[2], b[2])  # frozen by hand: unchanged
  assert fn._cache_size() == 1


@jax.enable_x64(True)
def test_vmap_and_unroll_agree():
  """The two ways of running the members (batched on accelerators, one after another on CPU)
  compute the same steps (to float rounding: the batched convolutions sum in another order)."""
  weights = [{"ce": 0.5, "cyborg": 0.5}, {"ce": 0.5, "cyborg": 2.0}]
  out = {}
  for strategy in ("vmap", "unroll"):
    setup, pop, fn, batches = _population(weights, [0, 1], strategy)
    for b in batches:
      pop, _ = fn(pop, sharding.to_global(b, setup.mesh))
    out[strategy] = jax.tree.map(np.asarray, pop.params)
  for a, b in zip(jax.tree.leaves(out["vmap"]), jax.tree.leaves(out["unroll"])):
    assert a.dtype == np.float64
    np.testing.assert_allclose(a, b, **EXACT)


def test_population_on_device_with_steps_per_dispatch_and_resume(tmp_path):
  """Device-resident data, 3 steps per dispatch (logging every 3 steps, so that no event falls
  inside a dispatch), each member its own order; stopped at step 3 and continued to 6
  (--allow_config_change), the members resume from their common step. The members are
  vmapped (unrolled, k steps of N members compile k x N bodies on XLA:CPU)."""
  overrides = dict(
    TINY,
    log_every_steps=3,
    data__on_device=True,
    steps_per_dispatch=3,
    num_train_steps=3,
    population__seeds="0,1",
    population__strategy="vmap",
    final_eval=False,
  )
  w = str(tmp_path / "pop")
  train.train_and_evaluate(load_config("iris_pad", "quick,cyborg", **overrides), w)
  longer = load_config(
    "iris_pad", "quick,cyborg", **dict(overrides, num_train_steps=6, final_eval=True)
  )
  results = train.train_and_evaluate(longer, w, allow_config_change=True)
  assert sorted(results) == ["s0", "s1"]
  for name in ("s0", "s1"):
    with open(os.path.join(w, "members", name, "config.json")) as f:
      member = members_lib.config_base.from_stored(json.load(f))
    assert member.data.shuffle_seed == -1  # on the device: its own order (its seed)
    (params, _), meta = final_params(member, os.path.join(w, "members", name))
    assert meta["step"] == 6 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  a, _ = final_params(member, os.path.join(w, "members", "s0"))
  b, _ = final_params(member, os.path.join(w, "members", "s1"))
  assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0])


def _event_tags(workdir) -> dict[str, set]:
  """{'scalars': tags, 'images': tags} of a workdir's TensorBoard events."""
  from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
  from tensorboard.compat.proto import event_pb2

  tags = {"scalars": set(), "images": set()}
  folder = os.path.join(workdir, "tensorboard")
  for name in os.listdir(folder):
    for record in RawEventFileLoader(os.path.join(folder, name)).Load():
      for v in event_pb2.Event.FromString(record).summary.value:
        tags["images" if v.HasField("image") else "scalars"].add(v.tag)
  return tags


@pytest.fixture(scope="module")
def watched_population(tmp_path_factory):
  """A population of two members (one seed, two weights) trained with its dispatches, metric
  fetches and checkpoint restores recorded (our own objects wrapped, in order): what each
  member's workdir holds and when the loop looked at the metrics. ``best_metric=epoch``: the last
  checkpoint is each member's best, so the final evaluation can use the state in memory."""
  from divisive_jax import checkpoints, loop

  events = []

  class Seen:
    def __init__(self, value, step):
      self.value, self.step = value, step

    def __array__(self, dtype=None, copy=None):
      events.append(("fetch", self.step))
      return np.asarray(self.value, dtype)

  def dispatch(self, state, step_):
    state, k, m = real_dispatch(self, state, step_)
    events.append(("dispatch", step_ + k))
    return state, k, {key: Seen(v, step_ + k) for key, v in m.items()}

  def restore_variables(self, *args, **kwargs):
    events.append(("restore_variables", self.directory))
    return real_restore(self, *args, **kwargs)

  real_dispatch, real_restore = loop.Dispatcher.__call__, checkpoints.Checkpoints.restore_variables
  c = load_config(
    "iris_pad",
    "quick,cyborg",
    **dict(TINY, log_every_steps=6, best_metric="epoch", model__dtype="float64"),
    population__seeds="3",
    population__weights="cyborg=0.2,2",
  )
  w = str(tmp_path_factory.mktemp("watched"))
  with pytest.MonkeyPatch.context() as mp, jax.enable_x64(True):
    mp.setattr(loop.Dispatcher, "__call__", dispatch)
    mp.setattr(checkpoints.Checkpoints, "restore_variables", restore_variables)
    results = train.train_and_evaluate(c, w)
  return w, results, events


@jax.enable_x64(True)
def test_population_equals_separate_runs(watched_population, tmp_path):
  w, results, _ = watched_population
  assert sorted(results) == ["s3_cyborg0.2", "s3_cyborg2"]
  for name in results:
    member_dir = os.path.join(w, "members", name)
    with open(os.path.join(member_dir, "config.json")) as f:
      member = members_lib.config_base.from_stored(json.load(f))
    alone = str(tmp_path / name)
    train.train_and_evaluate(member, alone)  # the member's own config, trained alone
    (p_pop, s_pop), meta = final_params(member, member_dir)
    (p_one, s_one), _ = final_params(member, alone)
    assert meta["step"] == 6
    for a, b in zip(jax.tree.leaves((p_pop, s_pop)), jax.tree.leaves((p_one, s_one))):
      assert a.dtype == np.float64
      np.testing.assert_allclose(a, b, **EXACT)
    for split in ("val", "test"):
      with open(os.path.join(member_dir, f"eval_{split}.json")) as f:
        a = json.load(f)
      with open(os.path.join(alone, f"eval_{split}.json")) as f:
        b = json.load(f)
      assert a["auroc"] == b["auroc"]
      assert a["checkpoint_step"] == b["checkpoint_step"]
  with open(os.path.join(w, "members", "s3_cyborg2", "result.json")) as f:
    r = json.load(f)
  assert r["weights"] == {"cyborg": 2.0} and r["seed"] == 3 and 0 <= r["test_auroc"] <= 1


def test_members_get_parameters_and_tensorboard_image_strips(watched_population):
  w, results, _ = watched_population
  tables = []
  for name in results:
    member = os.path.join(w, "members", name)
    with open(os.path.join(member, "parameters.txt")) as f:
      tables.append(f.read())
    assert "| Name" in tables[-1] and "Total: " in tables[-1]
    tags = _event_tags(member)
    assert {"loss", "val/auroc"} <= tags["scalars"]
    assert "val_cam/0" in tags["images"]  # image | true-class CAM | human map, per member
  assert tables[0] == tables[1]  # one seed: the same initial parameters, whatever the weights


def test_members_metrics_are_fetched_after_the_next_dispatch(watched_population):
  """The loop asks for a dispatch's metrics only after the next one is dispatched (the device
  decides which members live meanwhile), except where it must look: at logging, evaluation and
  checkpoint steps (here 3 and 6)."""
  _, _, events = watched_population
  train_events = [e for e in events if e[0] in ("dispatch", "fetch")]
  first_fetch = {}
  for i, (kind, s) in enumerate(train_events):
    if kind == "fetch":
      first_fetch.setdefault(s, i)
  dispatched = {s: i for i, (kind, s) in enumerate(train_events) if kind == "dispatch"}
  assert sorted(first_fetch) == list(range(1, 7))
  for s in (1, 2, 4, 5):
    assert first_fetch[s] > dispatched[s + 1], (s, train_events)
  for s in (3, 6):
    assert first_fetch[s] < dispatched.get(s + 1, len(train_events)), (s, train_events)


def test_members_final_evaluation_uses_the_state_in_memory(watched_population):
  w, results, events = watched_population
  assert all(r["best_step"] == 6 for r in results.values())
  assert [e for e in events if e[0] == "restore_variables"] == []  # nothing read back from disk
  for name in results:
    with open(os.path.join(w, "members", name, "eval_test.json")) as f:
      assert json.load(f)["checkpoint_step"] == 6


def test_population_batch_size_is_checked_before_the_data(tmp_path):
  c = load_config("iris_pad", "quick,cyborg", **dict(TINY, batch_size=18), population__seeds="0,1")
  w = str(tmp_path / "w")
  with pytest.raises(
    ConfigError,
    match=r"batch_size=18 must be divisible by the number of devices \(4\); e.g. --config.batch_size=16",
  ):
    train.train_and_evaluate(c, w)
  assert not os.path.exists(os.path.join(w, "data_info.json"))


def test_population_killed_while_its_members_save_resumes_bit_identically(tmp_path):
  """The state a kill -9 leaves while a population's members save step 6 -- one member done,
  the other with only a temporary folder of it -- resumes from the common step 4 and ends with
  every member bit-identical to an uninterrupted run."""
  import shutil

  c = load_config(
    "iris_pad",
    "quick,cyborg",
    **dict(TINY, checkpoint_every_steps=2, final_eval=False, population__strategy="vmap"),
    population__seeds="0,1",
  )
  ref = str(tmp_path / "ref")
  train.train_and_evaluate(c, ref)
  w = str(tmp_path / "killed")
  shutil.copytree(ref, w)

  def ckpts(name):
    return os.path.join(w, "members", name, "checkpoints")

  os.rename(os.path.join(ckpts("s1"), "6"), os.path.join(ckpts("s1"), "6.orbax-checkpoint-tmp"))
  assert 6 in completed_steps(os.path.join(w, "members", "s0"))
  train.train_and_evaluate(c, w)
  for name in ("s0", "s1"):
    member = os.path.join(w, "members", name)
    assert not [d for d in os.listdir(ckpts(name)) if "tmp" in d]  # the leftover is gone
    (p, s), meta = final_params(c, member)
    (p_ref, s_ref), _ = final_params(c, os.path.join(ref, "members", name))
    assert meta["step"] == 6
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p_ref, s_ref))):
      np.testing.assert_array_equal(a, b)
    with open(os.path.join(member, "metrics.jsonl")) as f:
      steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == [2, 4, 6]  # each logged step once: the redone ones replaced


def test_workdirs_of_a_population_say_which_run_to_look_at(watched_population, tmp_path):
  """evaluate, explain and report on a population root name its runs instead of 'train first'."""
  from divisive_jax import evaluate, explain, report
  from divisive_jax.errors import UserError

  w, results, _ = watched_population
  first = os.path.join(w, "members", sorted(results)[0])
  for call in (
    lambda: evaluate.evaluate_workdir(w),
    lambda: explain.explain(w, str(tmp_path / "out")),
    lambda: report.summarize_runs([w]),
  ):
    with pytest.raises(UserError) as e:
      call()
    msg = str(e.value)
    assert "is a population of 2 runs, not one run" in msg and first in msg, msg
    assert "train first" not in msg
  rows, _ = report.summarize_runs([os.path.join(w, "members", "*")])
  assert sum(r["n"] for r in rows) == 2


def test_a_population_grown_in_place_is_refused_before_anything_is_written(tmp_path):
  """Seeds added to a trained population's workdir: refused (the stored config does not name
  the new member), and the refused command leaves no folder of the new member behind."""
  from divisive_jax.errors import WorkdirError

  w = str(tmp_path / "pop")
  short = dict(TINY, num_train_steps=2, eval_every_steps=2, final_eval=False)
  train.train_and_evaluate(load_config("iris_pad", "quick", **short, population__seeds="0,1"), w)
  before = sorted(os.listdir(os.path.join(w, "members")))
  grown = load_config("iris_pad", "quick", **short, population__seeds="0,1,2")
  with pytest.raises(
    WorkdirError, match="without member.s. s2: a trained population does not grow"
  ):
    train.train_and_evaluate(grown, w)
  assert sorted(os.listdir(os.path.join(w, "members"))) == before == ["s0", "s1"]


def test_a_damaged_or_deleted_member_checkpoint_is_recovered(watched_population, tmp_path):
  """Issue 28, item 3: a truncated file in one member's newest checkpoint is one line for a
  command that reads it; training sets that checkpoint aside (nothing deleted) and falls back to
  the newest step every member can restore. A member whose folder was deleted is trained again
  from scratch up to that step, then the population resumes: the figures of both members are
  those of the uninterrupted population (float64: the retrained member ran in a program of
  one member instead of two)."""
  import shutil

  from divisive_jax import config_base, evaluate
  from divisive_jax.errors import CheckpointError

  original, results, _ = watched_population
  w = str(tmp_path / "pop")
  shutil.copytree(original, w)
  damaged, deleted = (os.path.join(w, "members", name) for name in sorted(results))
  newest = completed_steps(damaged)[-1]
  files = []
  for root, _, names in os.walk(os.path.join(damaged, "checkpoints", str(newest), "variables")):
    files += [os.path.join(root, n) for n in names if "ocdbt" in root and "manifest" not in n]
  with open(max(files, key=os.path.getsize), "r+b") as f:
    f.truncate(10)
  shutil.rmtree(deleted)
  with jax.enable_x64(True):
    with pytest.raises(CheckpointError, match=f"checkpoint {newest} in .* cannot be read .damaged"):
      evaluate.evaluate_workdir(damaged, newest)
    again = train.train_and_evaluate(config_base.load(w), w)
  assert os.listdir(os.path.join(damaged, "damaged_checkpoints")) == [str(newest)]
  assert completed_steps(deleted)[-1] == completed_steps(damaged)[-1] == newest
  for name, result in results.items():
    for key in ("best_step", "trained_step", "status", "weights"):
      assert again[name][key] == result[key], (name, key)
    for key in ("val_auroc", "val_loss", "test_auroc", "test_alignment_pe"):
      assert again[name][key] == pytest.approx(result[key], rel=1e-6), (name, key)

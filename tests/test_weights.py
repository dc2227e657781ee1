"""Reading weights files without PyTorch (`divisive_jax.models.torchvision.read_state_dict`).

The fixtures in tests/data/ were written by torch itself (``torch.save``, and safetensors'
writer) with `write_fixtures`; ``tiny_expected.npz`` holds torch's own values for them
(``tensor.float().numpy()`` for floats), so the reader is compared with torch exactly. Regenerate
them with a Python that has torch, torchvision, safetensors and this project's dependencies:

    PYTHONPATH=. python tests/test_weights.py

No test here needs torch; `test_a_fresh_torch_save_is_read` re-runs the writer where torch is
importable, to follow the installed torch's format.
"""

import copy
import io
import json
import logging
import os
import pickle
import shutil
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from divisive_jax.models import get_model
from divisive_jax.models.torchvision import (
  WeightsError,
  check_state_dict,
  load_torchvision_state_dict,
  read_state_dict,
)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def data(name):
  return os.path.join(DATA, name)


# ------------------------------------------------------------------ fixtures, written by torch
def write_fixtures(directory):
  """Writes the torch-made fixtures into ``directory`` (needs torch and safetensors)."""
  import torch
  from safetensors.torch import save_file

  torch.manual_seed(0)
  model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten()
  )
  model.train()(torch.randn(2, 3, 5, 5))  # running stats and num_batches_tracked move
  model.eval()
  state = model.state_dict()  # an OrderedDict with _metadata, as torchvision's are
  base = torch.randn(4, 6)
  extras = {
    "f32_transposed": base.t(),  # non-contiguous, stride (1, 6)
    "f32_view": base[1:3, ::2],  # the same storage: offset 6, stride (6, 2)
    "f16": torch.randn(5).half(),
    "bf16": torch.randn(2, 3).to(torch.bfloat16),
    "f64": torch.randn(3, dtype=torch.float64),
    "i64": torch.arange(4) * 3 - 5,
    "i32": torch.tensor([1, -2], dtype=torch.int32),
    "u16": torch.tensor([1, 65535], dtype=torch.uint16),  # UntypedStorage + _rebuild_tensor_v3
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
    "param": torch.nn.Parameter(torch.randn(2)),  # _rebuild_parameter
  }
  state.update({f"extra.{k}": v for k, v in extras.items()})

  def expected(tensor):
    tensor = tensor.detach()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()

  os.makedirs(directory, exist_ok=True)
  np.savez(
    os.path.join(directory, "tiny_expected.npz"), **{k: expected(v) for k, v in state.items()}
  )
  torch.save(state, os.path.join(directory, "tiny.pth"))
  trained = copy.deepcopy(model)  # leaves `state` (views of model's tensors) as it is
  optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
  trained(torch.randn(2, 3, 5, 5)).sum().backward()
  optimizer.step()  # momentum buffers: tensors outside the state dict
  torch.save(
    {"epoch": 3, "state_dict": state, "optimizer": optimizer.state_dict()},
    os.path.join(directory, "tiny_checkpoint.pth"),
  )
  parallel = torch.nn.DataParallel(model).state_dict()  # 'module.conv.weight', ...
  parallel.update({f"module.extra.{k}": v for k, v in extras.items()})
  torch.save(parallel, os.path.join(directory, "tiny_dataparallel.pth"))
  save_file(
    {k: v.detach().contiguous().clone() for k, v in state.items()},
    os.path.join(directory, "tiny.safetensors"),
    metadata={"format": "pt"},
  )
  torch.save(model, os.path.join(directory, "whole_model.pth"))
  torch.save(
    {"conv.weight": state["0.weight"]},
    os.path.join(directory, "legacy.pth"),
    _use_new_zipfile_serialization=False,
  )
  torch.save([torch.ones(2)], os.path.join(directory, "tensor_list.pth"))


def resnet18_shapes():
  """torchvision's resnet18 state dict: key -> shape (written with torchvision)."""
  with open(data("resnet18_torchvision_shapes.json")) as f:
    return {k: tuple(v) for k, v in json.load(f).items()}


@pytest.fixture(autouse=True)
def no_torch(monkeypatch, request):
  """Every test but the torch writer's runs with ``import torch`` failing."""
  if request.node.name != "test_a_fresh_torch_save_is_read":
    monkeypatch.setitem(sys.modules, "torch", None)


def expected_tiny():
  with np.load(data("tiny_expected.npz")) as npz:
    return {k: npz[k] for k in npz.files}


def assert_same(state, expected, ordered=True):
  assert list(state) == list(expected) if ordered else sorted(state) == sorted(expected)
  for key, value in expected.items():
    assert isinstance(state[key], np.ndarray), key
    assert state[key].dtype == value.dtype, key
    assert state[key].shape == value.shape, key
    np.testing.assert_array_equal(state[key], value, err_msg=key)


# -------------------------------------------------------------------------- reading formats
def test_pth_matches_torch():
  state, expected = read_state_dict(data("tiny.pth")), expected_tiny()
  assert_same(state, expected)
  assert state["extra.f16"].dtype == state["extra.bf16"].dtype == np.float32
  assert state["extra.f64"].dtype == np.float32
  assert state["1.num_batches_tracked"].dtype == np.int64 and state["1.num_batches_tracked"] == 1
  assert (state["extra.i32"].dtype, state["extra.u16"].dtype) == (np.int32, np.uint16)
  assert state["extra.bool"].dtype == bool and state["extra.scalar"].shape == ()
  base = state["extra.f32_transposed"].T  # the two views of one storage
  np.testing.assert_array_equal(state["extra.f32_view"], base[1:3, ::2])
  assert all(v.flags.c_contiguous for v in state.values())


def test_checkpoint_dict_is_unwrapped(caplog):
  with caplog.at_level(logging.INFO):
    state = read_state_dict(data("tiny_checkpoint.pth"))
  assert_same(state, expected_tiny())
  assert "'state_dict' entry" in caplog.text and "optimizer" in caplog.text


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_wrappers_are_unwrapped(tmp_path, key, caplog):
  """NumPy arrays pickled inside torch's zip layout, wrapped and prefixed."""
  state = {"a.weight": np.arange(6.0).reshape(2, 3), "a.num_batches_tracked": np.array(3)}
  wrapped = {"epoch": 1, key: {f"module.{k}": v for k, v in state.items()}, "best": 0.5}
  with caplog.at_level(logging.INFO):
    read = read_state_dict(rewrite_pickle(tmp_path, wrapped))
  assert f"'{key}' entry" in caplog.text and "module." in caplog.text
  assert list(read) == list(state) and read["a.weight"].dtype == np.float32
  np.testing.assert_array_equal(read["a.weight"], state["a.weight"])
  assert read["a.num_batches_tracked"].dtype == np.int64


def test_dataparallel_prefix_is_stripped(caplog):
  with caplog.at_level(logging.INFO):
    state = read_state_dict(data("tiny_dataparallel.pth"))
  assert_same(state, expected_tiny())
  assert "module." in caplog.text


def test_safetensors_matches_torch():
  assert_same(read_state_dict(data("tiny.safetensors")), expected_tiny(), ordered=False)


def test_npz(tmp_path):
  path = tmp_path / "weights.weights"  # the format is told by content, not by name
  np.savez(path, **{"a.weight": np.arange(6.0).reshape(2, 3), "b": np.int64(4)})
  state = read_state_dict(str(path) + ".npz")
  assert state["a.weight"].dtype == np.float32 and state["b"].dtype == np.int64
  shutil.copy(str(path) + ".npz", path)
  np.testing.assert_array_equal(read_state_dict(path)["a.weight"], np.arange(6.0).reshape(2, 3))


def test_safetensors_written_here_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {
    "w": rng.normal(size=(3, 2, 2)).astype(np.float32),
    "h": rng.normal(size=4).astype(np.float16),
    "n": np.array([3, -1], np.int64),
    "e": np.zeros((0, 2), np.float32),
  }
  path = tmp_path / "w.safetensors"
  write_safetensors(path, arrays)
  state = read_state_dict(path)
  for key, value in arrays.items():
    np.testing.assert_array_equal(state[key], value)
    assert state[key].dtype == (np.float32 if value.dtype.kind == "f" else value.dtype)


# ------------------------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
  with pytest.raises(WeightsError, match=r"missing\.pth does not exist.*pretrained_path"):
    read_state_dict(tmp_path / "missing.pth")


def test_directory(tmp_path):
  with pytest.raises(WeightsError, match="is a directory; give the weights file itself"):
    read_state_dict(tmp_path)


@pytest.mark.parametrize(
  "content, kind",
  [
    (np.random.default_rng(0).bytes(4096), ""),
    (b"", ""),
    (pickle.dumps({"a": 1}), r" \(a plain pickle\?\)"),
    (b"\x93NUMPY\x01\x00" + bytes(100), r" \(a single \.npy array\?\)"),
  ],
)
def test_unknown_format(tmp_path, content, kind):
  path = tmp_path / "weights.pth"
  path.write_bytes(content)
  with pytest.raises(
    WeightsError,
    match=rf"weights\.pth is not a PyTorch \.pth \(zip\), \.safetensors or \.npz file{kind}",
  ):
    read_state_dict(path)


def test_other_zip(tmp_path):
  path = tmp_path / "weights.zip"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("readme.txt", "hello")
  with pytest.raises(WeightsError, match=r"a zip archive but not .*readme\.txt"):
    read_state_dict(path)


def test_whole_pickled_model():
  with pytest.raises(
    WeightsError,
    match=r"whole_model\.pth is a whole pickled model \(it holds a "
    r"torch\.nn\.modules\.container\.Sequential object\), not a state dict; save the weights "
    r"only: torch\.save\(model\.state_dict\(\), path\)",
  ):
    read_state_dict(data("whole_model.pth"))


def test_whole_pickled_torchvision_model(tmp_path):
  resnet = b"\x80\x02ctorchvision.models.resnet\nResNet\nq\x00)\x81q\x01}q\x02b."
  with pytest.raises(
    WeightsError, match=r"whole pickled model .*torchvision\.models\.resnet\.ResNet"
  ):
    read_state_dict(rewrite_pickle(tmp_path, resnet))


def test_legacy_format():
  with pytest.raises(
    WeightsError, match=r"legacy \(pre-1\.6, non-zip\) format.*re-save it.*\.safetensors/\.npz"
  ):
    read_state_dict(data("legacy.pth"))


def test_not_a_mapping():
  with pytest.raises(WeightsError, match=r"tensor_list\.pth holds a list, not a state dict"):
    read_state_dict(data("tensor_list.pth"))


def test_mapping_of_other_things(tmp_path):
  with pytest.raises(WeightsError, match=r"its entry 'name' is a str, not a tensor"):
    read_state_dict(rewrite_pickle(tmp_path, {"name": "resnet", "epoch": 3}))
  with pytest.raises(WeightsError, match="empty state dict"):
    read_state_dict(rewrite_pickle(tmp_path, {}))


class Boom:
  """Pickles as a call of os.system: the reader must refuse it, never run it."""

  def __reduce__(self):
    return (os.system, ("touch " + os.environ["BOOM_FILE"],))


def test_pickled_code_is_never_run(tmp_path, monkeypatch):
  marker = tmp_path / "boom"
  monkeypatch.setenv("BOOM_FILE", str(marker))
  for protocol in (2, 4):
    path = rewrite_pickle(tmp_path, pickle.dumps({"a": Boom()}, protocol=protocol))
    with pytest.raises(WeightsError, match=r"refusing to unpickle posix\.system"):
      read_state_dict(path)
  assert not marker.exists()


def tensor_pickle(size, stride, offset=0, key="0", storage=b"FloatStorage", numel=108):
  """data.pkl for {'w': tensor} as torch.save writes it (protocol 2), by hand: a tensor of
  ``size``/``stride``/``offset`` on storage record ``key``."""

  def text(s):
    s = s.encode() if isinstance(s, str) else s
    return b"X" + len(s).to_bytes(4, "little") + s

  def ints(xs):
    return b"(" + b"".join(b"J" + int(x).to_bytes(4, "little", signed=True) for x in xs) + b"t"

  record = b"(" + text("storage") + b"ctorch\n" + storage + b"\n" + text(key) + text("cpu")
  record += b"J" + numel.to_bytes(4, "little") + b"tQ"
  args = record + b"J" + offset.to_bytes(4, "little") + ints(size) + ints(stride)
  args += b"\x89ccollections\nOrderedDict\n)R"
  tensor = b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR"
  return b"\x80\x02}" + text("w") + tensor + b"s."


def test_strided_tensor_by_hand(tmp_path):
  """tiny.pth's storage 0 holds torch's '0.weight' (4, 3, 3, 3): view it with other strides."""
  flat = expected_tiny()["0.weight"].ravel()
  read = read_state_dict(rewrite_pickle(tmp_path, tensor_pickle((2, 3), (1, 2), offset=5)))
  np.testing.assert_array_equal(read["w"], flat[5 + np.arange(2)[:, None] + 2 * np.arange(3)])
  read = read_state_dict(rewrite_pickle(tmp_path, tensor_pickle((3,), (0,), offset=7)))
  np.testing.assert_array_equal(read["w"], [flat[7]] * 3)  # stride 0: a broadcast


@pytest.mark.parametrize(
  "pkl, match",
  [
    (tensor_pickle((4, 1000), (1, 4)), "overruns its storage of 108 elements"),
    (tensor_pickle((2,), (1,), offset=107), "overruns its storage"),
    (tensor_pickle((2,), (-1,)), "bad tensor geometry"),
    (tensor_pickle((2, 2), (1,)), "bad tensor geometry"),
    (tensor_pickle((2,), (1,), key="99"), "storage record data/99 is missing"),
    (tensor_pickle((2,), (1,), storage=b"QInt8Storage"), r"refusing to unpickle torch\.QInt8"),
  ],
)
def test_bad_tensor_records(tmp_path, pkl, match):
  """Tensors reaching past their storage record, or on no record, are errors, not reads."""
  with pytest.raises(WeightsError, match=match):
    read_state_dict(rewrite_pickle(tmp_path, pkl))


def test_corrupt_safetensors(tmp_path):
  path = tmp_path / "w.safetensors"
  write_safetensors(path, {"w": np.ones((4, 4), np.float32)})
  path.write_bytes(path.read_bytes()[:-8])
  with pytest.raises(WeightsError, match=r"not a valid \.safetensors file: tensor 'w'"):
    read_state_dict(path)


def test_npz_with_objects(tmp_path):
  path = tmp_path / "w.npz"
  np.savez(path, w=np.array([{"a": 1}], dtype=object))
  with pytest.raises(WeightsError, match="a .npz holding Python objects"):
    read_state_dict(path)


# ----------------------------------------------------------------- loading into our models
LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean"}


def torchvision_layout(variables):
  """Our ResNet variables (arrays or ShapeDtypeStructs) as a torchvision state dict."""
  state = {}
  for col in ("params", "batch_stats"):
    for path, value in jax.tree_util.tree_flatten_with_path(variables[col])[0]:
      *module, leaf = (k.key for k in path)
      module = "fc" if module == ["head"] else ".".join(module[1:]).replace("_", ".")
      if isinstance(value, jax.ShapeDtypeStruct):
        value = np.zeros(value.shape, np.float32)
      value = np.asarray(value)
      if leaf == "kernel":
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      state[f"{module}.{LEAVES.get(leaf, 'running_var')}"] = value
  return state


def resnet18(**fields):
  cfg = ConfigDict({"name": "resnet18", **fields})
  model = get_model(cfg)
  return cfg, model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_our_resnet18_has_torchvisions_layout():
  cfg, _, abstract = resnet18(num_outputs=1000)  # width 64: torchvision's shapes
  shapes = {k: v.shape for k, v in torchvision_layout(abstract).items()}
  theirs = {k: v for k, v in resnet18_shapes().items() if "num_batches_tracked" not in k}
  assert shapes == theirs
  assert check_state_dict(torchvision_layout(abstract), cfg, abstract)


def random_like(abstract, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), abstract)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_resnet18_file_round_trip(tmp_path, suffix):
  cfg, _, abstract = resnet18(width=8)  # torchvision's keys, narrow shapes
  variables = random_like(abstract)
  state = {f"module.{k}": v for k, v in torchvision_layout(variables).items()}
  state["module.layer1.0.bn1.num_batches_tracked"] = np.array(5)
  path = tmp_path / f"resnet18{suffix}"
  if suffix == ".npz":
    np.savez(path, **state)
  else:
    write_safetensors(path, state)
  checked = check_state_dict(path, cfg, abstract)
  assert "layer1.0.bn1.num_batches_tracked" in checked
  for source in (str(path), checked):
    loaded = load_torchvision_state_dict(source, cfg, abstract)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_check_state_dict_errors(tmp_path):
  cfg, _, abstract = resnet18(width=8)
  state = torchvision_layout(random_like(abstract))
  small_cfg, _, small = resnet18(width=8, stem="small")
  with pytest.raises(WeightsError, match=r"conv1\.weight.*\(8, 3, 7, 7\).*stem='imagenet'"):
    check_state_dict(state, small_cfg, small)
  path = tmp_path / "w.npz"
  np.savez(path, **{**state, "extra.weight": np.zeros(3)})
  with pytest.raises(WeightsError, match=r"w\.npz does not match .*unexpected keys \[extra\."):
    check_state_dict(path, cfg, abstract)
  del state["layer4.1.bn2.running_var"]
  with pytest.raises(
    WeightsError, match=r"missing variables \[batch_stats/backbone/layer4_1/bn2/var\]"
  ):
    check_state_dict(state, cfg, abstract)
  with pytest.raises(WeightsError, match="No torchvision weights for model 'tiny'"):
    check_state_dict(state, ConfigDict({"name": "tiny"}), abstract)
  with pytest.raises(WeightsError, match="does not exist"):
    load_torchvision_state_dict(tmp_path / "none.pth", cfg, abstract)


def test_a_fresh_torch_save_is_read(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("safetensors")
  write_fixtures(tmp_path)
  with np.load(tmp_path / "tiny_expected.npz") as npz:
    expected = {k: npz[k] for k in npz.files}
  for name in ("tiny.pth", "tiny_checkpoint.pth", "tiny_dataparallel.pth", "tiny.safetensors"):
    assert_same(read_state_dict(tmp_path / name), expected, ordered=not name.endswith("tensors"))
  with pytest.raises(WeightsError, match="whole pickled model"):
    read_state_dict(tmp_path / "whole_model.pth")
  with pytest.raises(WeightsError, match="legacy"):
    read_state_dict(tmp_path / "legacy.pth")


# ---------------------------------------------------------------------------------- helpers
def rewrite_pickle(tmp_path, obj):
  """A copy of tiny.pth (torch's zip layout and storages) with another data.pkl: ``obj`` as
  pickle bytes, or an object to pickle (protocol 2, as torch.save)."""
  pkl = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
  path = tmp_path / f"rewritten{len(os.listdir(tmp_path))}.pth"
  with zipfile.ZipFile(data("tiny.pth")) as src, zipfile.ZipFile(path, "w") as dst:
    for info in src.infolist():
      content = pkl if info.filename.endswith("/data.pkl") else src.read(info)
      dst.writestr(info, content)
  return path


def write_safetensors(path, arrays):
  """The safetensors format: u64 header length, JSON header, raw little-endian bytes."""
  names = {"float32": "F32", "float16": "F16", "int64": "I64"}
  header, blobs, offset = {"__metadata__": {"format": "np"}}, io.BytesIO(), 0
  for key, value in arrays.items():
    value = np.ascontiguousarray(value)
    size = value.nbytes
    header[key] = {
      "dtype": names[str(value.dtype)],
      "shape": list(value.shape),
      "data_offsets": [offset, offset + size],
    }
    blobs.write(value.tobytes())
    offset += size
  text = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text + blobs.getvalue())


if __name__ == "__main__":
  write_fixtures(DATA)
  import torchvision

  shapes = {k: list(v.shape) for k, v in torchvision.models.resnet18().state_dict().items()}
  with open(data("resnet18_torchvision_shapes.json"), "w") as f:
    f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {v}" for k, v in shapes.items()) + "\n}\n")

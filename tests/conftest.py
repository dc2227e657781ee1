"""Test-wide setup, before jax is imported.

* 4 simulated CPU devices so the sharded paths run in one process (XLA reads the flag when the
  backend starts).
* XLA's CPU backend at optimisation level 1 (`helpers.TEST_XLA_FLAGS`, subprocesses too): the
  tests' programs are small and run a few steps, so compiling dominates, and level 1 compiles
  them faster; the numerics differ from level 2 by rounding only, which no test may depend on
  (the exact comparisons hold at either level: tests/test_step.py).
* One persistent compilation cache for the session, shared with the subprocesses the tests start
  (they inherit the environment), so the same step is not compiled again in every process.
"""

import atexit
import os
import shutil
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="divisive_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

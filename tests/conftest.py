"""Test-wide setup: 4 simulated CPU devices so the sharded paths run in one process.

XLA reads the flag when the backend starts, so it must be set before jax is imported.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

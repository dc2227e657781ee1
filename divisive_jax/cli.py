"""What every command-line entry point shares (one CLI library: absl).

* `run(main)`: ``absl.app.run`` with a flag parser that turns a bad ``--config.x.y=v`` override
  into one line naming the field and the closest valid names, and a main wrapper that refuses
  stray positional arguments (unless ``args=True``), starts ``jax.distributed`` when the
  multi-host flags ask for it (`multihost.initialize`) and prints our own errors
  (`errors.UserError`, e.g. bad data, a bad config, a locked workdir) as one line
  ``error: ...`` without a traceback (exit status 1; a job stopped by a signal after saving,
  ``stopped: ...`` and 128 + the signal's number: 143 for SIGTERM, 130 for Ctrl-C). Unexpected
  exceptions keep their traceback.
* the run's log reads as a story of the run: `writers.quiet_library_logs` silences the
  libraries' INFO chatter.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

from absl import app, flags

from divisive_jax import writers
from divisive_jax.errors import UserError


def run(main, args: bool = False) -> None:
  """``app.run(main)`` with short errors (see module docstring)."""

  def start(argv):
    if len(argv) > 1 and not args:
      raise UserError(f"unexpected arguments: {argv[1:]}")
    if "config" in flags.FLAGS:
      try:  # a config file loads when first read: a missing or broken one fails here
        flags.FLAGS.config.keys()
      except Exception as e:  # noqa: BLE001 - said in one line
        raise UserError(config_error(sys.argv, e)) from None
    if "distributed" in flags.FLAGS:
      from divisive_jax import multihost

      multihost.initialize(flags.FLAGS)
    return main(argv)

  def wrapped(argv):
    writers.quiet_library_logs()
    return short_errors(start, argv)

  app.run(wrapped, flags_parser=_parse_flags)


def short_errors(fn, *args):
  """``fn(*args)``; a `UserError` is one line on stderr, then exit (a signal's stop,
  `Interrupted`, with its conventional status). `run` uses it; so can scripts without absl."""
  try:
    return fn(*args)
  except UserError as e:
    print(f"{getattr(e, 'label', 'error')}: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_status", 1))


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - absl's own errors and a config that failed to load
    config_args = [a for a in argv[1:] if a.startswith("--config")]
    if config_args and (not isinstance(e, flags.Error) or "--config" in str(e)):
      message = config_error(argv, e)
    elif isinstance(e, flags.Error):
      message = f"{e}\nPass --help to list the flags."
    else:
      raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def config_error(argv, error: Exception) -> str:
  """One line for a config that failed to load or an override that failed to apply."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  config = None
  if spec is not None:
    path, _, arg = spec.partition(":")
    try:
      config = load_config_file(path, arg or None)
    except UserError as e:
      return f"--config={spec}: {e}"
    except Exception as e:  # noqa: BLE001
      return f"--config={spec}: {type(e).__name__}: {_last_line(e)}"
  if config is not None:
    for a in argv:
      if a.startswith("--config.") and "=" in a:
        field = a[len("--config.") : a.index("=")]
        if problem := missing_field(config, field):
          return f"--config.{field}: {problem}"
  return _last_line(error)


def missing_field(config, dotted: str) -> str | None:
  """Why ``config.<dotted>`` does not exist (with the closest valid names), or None."""
  node, walked = config, "config"
  for part in dotted.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      near = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
      hint = f"did you mean {' or '.join(near)}?" if near else f"valid: {', '.join(sorted(keys))}"
      return f"unknown field {part!r} in {walked}; {hint}"
    node, walked = node[part], f"{walked}.{part}"
  return None


def load_config_file(path: str, arg: str | None = None):
  """``get_config(arg)`` of a config file, loaded as ``--config=path:arg`` loads it."""
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    files = [f for f in os.listdir(folder) if f.endswith(".py")] if os.path.isdir(folder) else []
    near = difflib.get_close_matches(os.path.basename(path), files, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(os.path.join(folder, n) for n in near)}?" if near else ""
    raise UserError(f"config file {path} not found{hint}")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def _last_line(error: Exception) -> str:
  text = str(error).strip().strip("'\"").replace("\\n", "\n")
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__

"""The project's own error types.

A `UserError` is bad input or usage that the message alone explains (the file, the field, the
fix): every entry point prints it as one short line without a traceback (`cli.run`).
Unexpected exceptions keep their traceback.
"""


class UserError(Exception):
  """Bad input or usage; printed without a traceback."""


class ConfigError(UserError, ValueError):
  """A config field is unknown, missing or has an invalid value."""


class WorkdirError(UserError):
  """The workdir is locked by another run, holds another experiment, or is not a workdir."""


class CheckpointError(UserError):
  """A checkpoint could not be written (e.g. no space left on device) or read."""


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss or the parameters became NaN or infinite; the run stopped."""

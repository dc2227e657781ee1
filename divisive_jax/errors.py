"""The project's own error types, and failed writes for lack of space turned into them.

A `UserError` is bad input or usage that the message alone explains (the file, the field, the
fix): every entry point prints it as one short line without a traceback (`cli.run`).
Unexpected exceptions keep their traceback. `disk_full` turns a write that failed because the
disk cannot take it (full, over quota, a file-size limit, read-only) into one such line.
"""

import contextlib
import errno
import os

# errno values that mean "the disk cannot take this write"; orbax and tensorstore may report
# them as OSError or inside another exception's text.
_WRITE_ERRORS = {
  errno.ENOSPC: "no space left on device",
  errno.EDQUOT: "disk quota exceeded",
  errno.EFBIG: "file too large (a file-size limit)",
  errno.EROFS: "read-only file system",
}


class UserError(Exception):
  """Bad input or usage; printed without a traceback."""


class ConfigError(UserError, ValueError):
  """A config field is unknown, missing or has an invalid value."""


class WorkdirError(UserError):
  """The workdir is locked by another run, holds another experiment, or is not a workdir."""


class CheckpointError(UserError):
  """A checkpoint could not be written (e.g. no space left on device) or read."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint's files cannot be read (truncated, missing); the message names the folder."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class DataError(UserError, ValueError):
  """Bad data or data config; the message says where (file, line, field) and how to fix it."""


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss or the parameters became NaN or infinite; the run stopped."""


class Interrupted(UserError):
  """A signal (SIGTERM, SIGINT) stopped the job after it saved its checkpoints; the command's
  exit status is the shell's convention for that signal, 128 + its number."""

  label = "stopped"

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.exit_status = 128 + int(signum)


class DamagedFileError(UserError, ValueError):
  """A file the project wrote is damaged (not valid JSON); the message names it and the fix."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder a command needs is missing; the message names it and what makes it."""


def write_error_reason(error: BaseException) -> str | None:
  """Why a write failed, when it failed for lack of space (see `_WRITE_ERRORS`), else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _WRITE_ERRORS:
      return _WRITE_ERRORS[error.errno]
    text = str(error)
    for code, reason in _WRITE_ERRORS.items():
      if os.strerror(code) in text or reason in text.lower():
        return reason
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def disk_full(error_type, message):
  """Inside: a write that fails for lack of space raises ``error_type(message(reason))``, one
  line without the library's traceback; other errors pass."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
    reason = write_error_reason(e)
    if reason is None:
      raise
    raise error_type(message(reason)) from None

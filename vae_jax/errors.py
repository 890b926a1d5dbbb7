"""The one kind of error a user can fix: its message says what to change, and the command
line prints it as one line. Every other exception is a bug, and keeps its traceback.

Each module raises its own subclass (``config.ConfigError``, ``datasets.DataError``,
``checkpointing.CheckpointError``, ``loop.NonFiniteError``, ``locks.Busy``,
``files.WriteError``) where the fix is the user's; ``vae_jax.main`` catches
``UserError`` and nothing narrower or wider.
"""


class UserError(Exception):
  """Something the user can fix (a config value, a missing file, a busy workdir); the
  message says what to do."""

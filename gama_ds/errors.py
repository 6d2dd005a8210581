"""The project's own errors: one base, which the `gama-ds` command turns into a message.

Every error a user can act on (a recipe key, a shard, an input file, a checkpoint, an option)
derives from `GamaDsError`, and its message names what to change. The command prints such an
error as one line and exits with its `exit_code`; any other exception is a bug, ours or a
library's, and keeps its traceback. Each kind lives next to what it is about (ConfigError in
config.py, ShardError in data/shards.py, ...); the kinds here are the ones several modules raise.
Kinds that existing callers catch as ValueError or RuntimeError stay subclasses of those too.
"""

from __future__ import annotations


class GamaDsError(Exception):
    """An error in what the user gave (recipe, data, weights, options); the message says what."""

    exit_code = 2  # as argparse's usage errors


class UsageError(GamaDsError, ValueError):
    """Options or arguments that cannot be used together or at all."""


class CheckpointError(GamaDsError, RuntimeError):
    """A checkpoint that cannot be resumed or exported: missing, incomplete, another recipe's."""


class WeightsError(GamaDsError, ValueError):
    """Weights that do not fit the model: an export, a reference checkpoint, an adapter."""

"""The one error type every `jpeglm` command turns into a one-line message instead of a traceback.

A `UserError` means the user can fix it (a flag, a path, a config, the data or the environment): its message says
what is wrong and what to do, in one or two lines. `jpeglm.cli.main` prints it as `jpeglm COMMAND: error: MESSAGE`
and exits with `exit_code` (2 by default, as argparse does for bad usage). Subsystems subclass it
(PreprocessError, DataError, ConfigError, CheckpointError, SampleError, ...) so they stay importable without the CLI.
"""

from __future__ import annotations


class UserError(Exception):
    """A refused flag, path, config or input; the message says what to fix."""

    exit_code = 2

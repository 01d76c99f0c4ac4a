"""The errors a user can cause and fix. The CLIs print them as one line, with no traceback (:func:`fail`)."""

from __future__ import annotations

import sys
from typing import NoReturn


class LargebatchError(Exception):
    """Base class: bad input the user can fix; the message says what is wrong and how to fix it."""


class ConfigError(LargebatchError):
    """A config that cannot run (a batch that does not divide, a warmup longer than the run, ...)."""


class DataNotFoundError(LargebatchError):
    """A dataset's files are absent; the message names the package or path that provides them."""


class DiskFullError(LargebatchError):
    """The disk filled while a run wrote its records or a checkpoint; the message says how to resume."""


class NonFiniteError(LargebatchError):
    """Loss or gradient norm became inf/nan during training."""


def fail(error: Exception | str) -> NoReturn:
    """Print ``error: <message>`` (one line: Hydra's config-search-path appendix cut) and exit with 2; an
    error that carries its own ``exit_code`` and ``prefix`` (a driver stopped by a signal: 128 + the signal,
    "stopped") uses them."""
    message = str(error).split("\nConfig search path")[0].strip()
    print(f"{getattr(error, 'prefix', 'error')}: {message}", file=sys.stderr)
    raise SystemExit(getattr(error, "exit_code", 2))

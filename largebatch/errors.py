"""The errors a user can cause and fix. The CLI prints them as one line, with no traceback."""


class LargebatchError(Exception):
    """Base class: bad input the user can fix; the message says what is wrong and how to fix it."""


class ConfigError(LargebatchError):
    """A config that cannot run (a batch that does not divide, a warmup longer than the run, ...)."""


class DataNotFoundError(LargebatchError):
    """A dataset's files are absent; the message names the package or path that provides them."""


class NonFiniteError(LargebatchError):
    """Loss or gradient norm became inf/nan during training."""

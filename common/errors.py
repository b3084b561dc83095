"""The one exception type that user-facing commands turn into a one-line error."""


class FedprivError(Exception):
    """A problem with the user's input or environment, explained in one line.

    Commands catch it at the front door, print ``error: <message>`` and exit non-zero,
    without a traceback. Raise it for anything a user can fix: a bad config value, a
    missing or malformed data file, an unknown preset.
    """


class ConfigError(FedprivError):
    """The run configuration is malformed or invalid."""


class DataError(FedprivError):
    """A dataset could not be loaded, or its contents do not fit the run."""

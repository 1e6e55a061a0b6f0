"""Errors medsynth reports to the user as one line, without a traceback."""


class MedsynthError(ValueError):
    """A problem with the user's input (data, configuration, output folder) that the user can fix.

    The message is a single line that names the file or value at fault; the CLI prints it as
    ``medsynth: error: <message>`` and exits with status 2.
    """


class DataError(MedsynthError):
    """A data file or folder is missing, unreadable or inconsistent with the configuration."""

"""Errors that speak to the user: each names the file, the video and what is wrong."""


class CltdrError(Exception):
    """Base class of every error the command line reports as a message instead of a traceback."""


class DataError(CltdrError):
    """Bad input data: annotations, feature files, splits."""


class CheckpointError(CltdrError):
    """A checkpoint that cannot be read or does not fit the config."""

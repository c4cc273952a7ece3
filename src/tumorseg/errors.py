"""Errors raised for bad user input; the CLI prints them on one line and exits with 2."""


class TumorsegError(Exception):
    """Base class for errors caused by the user's input (files, options, checkpoints)."""


class ConfigError(TumorsegError, ValueError):
    """A configuration value is unknown, out of range or cannot be converted."""


class DataError(TumorsegError, ValueError):
    """A data folder or file is missing, unreadable or not in the expected layout."""


class CheckpointError(TumorsegError, ValueError):
    """A checkpoint file cannot be read or is not a tumorseg/original U-Net checkpoint."""

"""Errors a user can cause (bad config, missing data, unwritable paths): printed as one line, exit code 2."""


class UserError(Exception):
    """A one-line, actionable message naming the key or file and what was expected."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


class DataError(UserError):
    """A missing, empty or unreadable dataset."""

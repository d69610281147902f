"""Errors a user can cause (bad config, missing data, unwritable paths): printed as one line, exit code 2."""


class UserError(Exception):
    """A one-line, actionable message naming the key or file and what was expected."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


class DataError(UserError):
    """A missing, empty or unreadable dataset."""


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (errors from DataLoader workers carry a traceback; its last line names them)."""
    lines = [s for s in str(e).splitlines() if s.strip()]
    if not lines:
        return type(e).__name__
    last = lines[-1]
    for prefix in (f"{type(e).__module__}.{type(e).__name__}: ", f"{type(e).__name__}: "):
        if prefix in last:
            return last.split(prefix, 1)[1]
    return last

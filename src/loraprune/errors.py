"""One exception type for problems the user can fix; the CLI turns it into a one-line message and exit 2."""


class UserError(Exception):
    """Bad input (flag, path, data, model). The message names the problem and, where possible, the fix."""

"""The error type shared by all `flashsloth` subcommands."""

EXIT_USAGE_ERROR = 2


class CliError(Exception):
    """A user-facing error: `flashsloth` prints it as one line to stderr and exits with code 2."""

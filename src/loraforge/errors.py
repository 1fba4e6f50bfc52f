"""The one exception type for mistakes a user can make (bad paths, bad data, mismatched adapters).

The CLI prints these as a single line and exits with status 2; anything else is a bug and keeps its
traceback.
"""


class LoraForgeError(Exception):
    """A user-facing error: one sentence that names the file, line or field and says what to fix."""

"""The one exception type for user errors; the CLI turns it into one line and exit code 2."""


class SonocadError(Exception):
    """A problem with the user's input (path, image, option, CSV, model file), not a bug."""

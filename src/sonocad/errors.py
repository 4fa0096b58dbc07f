"""The one exception type for user errors; the CLI turns it into one line and exit code 2."""


def one_line(text) -> str:
    """`text` with line breaks shown as \\n, so that an error is always one line whatever the user typed."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


class SonocadError(Exception):
    """A problem with the user's input (path, image, option, CSV, model file), not a bug."""

    def __init__(self, message: str = ""):
        super().__init__(one_line(message))


class OptionError(SonocadError):
    """An impossible value of one option, named as the library calls it (`img_size`); the CLI shows the
    flag instead (`--img-size`), so neither a Python caller nor a shell user sees the other's spelling.

    >>> str(OptionError("img_size", "must be at least 32 px, not 8"))
    'img_size: must be at least 32 px, not 8'
    """

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, one_line(message)

    @property
    def flag(self) -> str:
        return "--" + self.option.replace("_", "-")


class MissingExtra(SonocadError):
    """An optional part of sonocad (an extra: serve, onnx, dicom, faiss) is not installed. Raised before any work;
    code that turns bad images into warnings (--skip-bad) lets it through, since every file would fail alike."""

    def __init__(self, extra: str, message: str):
        super().__init__(message)
        self.extra = extra


class SonocadWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it as one line)."""

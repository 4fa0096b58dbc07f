"""The one exception type for user errors; the CLI turns it into one line and exit code 2."""


class SonocadError(Exception):
    """A problem with the user's input (path, image, option, CSV, model file), not a bug."""


class OptionError(SonocadError):
    """An impossible value of one option, named as the library calls it (`img_size`); the CLI shows the
    flag instead (`--img-size`), so neither a Python caller nor a shell user sees the other's spelling.

    >>> str(OptionError("img_size", "must be at least 32 px, not 8"))
    'img_size: must be at least 32 px, not 8'
    """

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message

    @property
    def flag(self) -> str:
        return "--" + self.option.replace("_", "-")

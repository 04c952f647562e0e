"""Errors users can act on. The CLI prints their message without a stack trace."""


class UserError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class DatasetLayoutError(UserError):
    """The dataset folder does not follow the MVTec AD layout."""


class ImageReadError(UserError):
    """An image or mask file cannot be decoded."""


class WeightsUnavailableError(UserError):
    """Pretrained backbone weights are neither cached nor downloadable."""


class RunDirError(UserError):
    """A run directory is missing files or holds files this version cannot read."""


class TrainingInterrupted(Exception):
    """Training stopped part-way (workers lost beyond the allowed restarts); its checkpoints are kept."""


class ImageTooLargeError(ImageReadError):
    """An image's header declares more pixels than the limit (--max-pixels); nothing was decoded."""

    def __init__(self, message: str, pixels: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.pixels = pixels
        self.limit = limit

    def __reduce__(self):  # Ray pickles errors between processes: keep the numbers
        return (type(self), (str(self), self.pixels, self.limit))

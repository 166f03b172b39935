"""The converter's one error type: a single line naming the file, tensor or argument."""

from gemma4_mlx.checkpoint.files import LoadError


class ConvertError(LoadError):
    """Subclass of LoadError so callers catching load errors also catch these."""


class InterruptedAfterPublishing(KeyboardInterrupt):
    """An interrupt (Ctrl-C) that arrived once the new DST was already in place: the
    conversion is complete on disk, only its clean-up or report was cut short."""

    def __init__(self, dst):
        super().__init__(f"{dst}: interrupted after the conversion was written (it is complete)")
        self.dst = dst

"""The converter's one error type: a single line naming the file, tensor or argument."""

from gemma4_mlx.checkpoint.files import LoadError


class ConvertError(LoadError):
    """Subclass of LoadError so callers catching load errors also catch these."""

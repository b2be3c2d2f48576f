"""Exceptions with messages meant for users: what was wrong and what to do."""


class PAMError(Exception):
    """Base class of every error PAMSegmentLib reports to a user."""


class InputError(PAMError, ValueError):
    """Bad image, prompt, geometry or option. The CLI exits with status 2."""


class CheckpointError(PAMError):
    """A checkpoint file that cannot be used (unreadable, wrong keys or shapes, wrong format)."""


class PropagationCancelled(PAMError):
    """Raised inside a propagation when its cancel token was set; nothing was written."""


class EmptySegment(InputError):
    """The segment to propagate holds no voxel (Slicer's "Propagate all drawn segments" passes it over)."""


class DrawnIn3D(InputError):
    """A prompt label drawn on too many slices to be keyframes: a 3D mask, not a drawing. ``where``
    says on how many ("30 of 30 axial slices")."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where


class PaintedAcross(InputError):
    """One outline painted in a slice view not aligned with an oblique volume: it crosses the volume's
    slices in bands (Slicer's "Rotate to volume plane" avoids it)."""


class NotEnoughMemory(InputError):
    """A job refused before it started because its estimated peak memory exceeds what is free
    (Slicer's panel then offers to run it anyway); ``reason`` says why without the Python advice."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = message if reason is None else reason


_MEMORY_TEXTS = ("can't allocate memory", "cannot allocate memory", "not enough memory", "failed to allocate memory",
                 "out of memory", "unable to allocate")


def out_of_memory(exc: BaseException) -> bool:
    """numpy's MemoryError, or the RuntimeError PyTorch's allocator (CPU or CUDA) and ITK raise when
    memory runs out."""
    return isinstance(exc, MemoryError) or (isinstance(exc, (RuntimeError, OSError))
                                            and any(t in str(exc).lower() for t in _MEMORY_TEXTS))

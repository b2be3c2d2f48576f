"""PAMSegmentLib: propagate a mask drawn on one slice through a 3D volume (PAM)."""

__version__ = "0.1.0"

from .errors import CheckpointError, InputError, NotEnoughMemory, PAMError, PropagationCancelled  # noqa: F401

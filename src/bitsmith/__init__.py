"""bitsmith: make PyTorch models small and keep them useful."""
__version__ = "0.1.0"

from . import api as _api  # noqa: E402
from .api import *  # noqa: E402,F401,F403  (quantize_tensor, quantize_file, load_state, ...)
from .errors import BitsmithError, CheckpointError, QuantizationError, SpecError  # noqa: E402
from .formats import QTensor  # noqa: E402
from .nn import QuantConv2d, QuantLinear  # noqa: E402

__all__ = [
    *_api.__all__,
    "QTensor",
    "QuantLinear",
    "QuantConv2d",
    "BitsmithError",
    "CheckpointError",
    "QuantizationError",
    "SpecError",
]

"""bitsmith: make PyTorch models small and keep them useful."""
__version__ = "0.1.0"

from .api import (  # noqa: E402
    QuantizeReport,
    Recipe,
    load_model,
    load_qtensors,
    load_state,
    quantize_file,
    quantize_model,
    quantize_tensor,
)
from .errors import BitsmithError, CheckpointError, QuantizationError, SpecError  # noqa: E402
from .formats import QTensor  # noqa: E402
from .nn import QuantConv2d, QuantLinear  # noqa: E402

__all__ = [
    "quantize_tensor",
    "quantize_file",
    "load_state",
    "load_qtensors",
    "quantize_model",
    "load_model",
    "Recipe",
    "QuantizeReport",
    "QTensor",
    "QuantLinear",
    "QuantConv2d",
    "BitsmithError",
    "CheckpointError",
    "QuantizationError",
    "SpecError",
]

"""Runtime modules: packed weights, torch reference forward."""
from .quant_conv import QuantConv2d
from .quant_linear import QuantLinear
from .quant_module import QuantWeightMixin

__all__ = ["QuantLinear", "QuantConv2d", "QuantWeightMixin"]

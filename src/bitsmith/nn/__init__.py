"""Runtime modules: packed weights, torch reference forward."""
from .quant_conv import QuantConv2d
from .quant_linear import QuantLinear
from .low_rank import LowRankQuantLinear
from .low_rank_conv import LowRankQuantConv2d
from .quant_module import QuantWeightMixin
from .smoothed import SmoothedLinear
from .registry import RUNTIME_MODULES, register_runtime_module
from .w8a8_linear import W8A8Linear

__all__ = ["W8A8Linear", "LowRankQuantLinear", "LowRankQuantConv2d", "SmoothedLinear", "QuantLinear", "QuantConv2d", "QuantWeightMixin", "RUNTIME_MODULES", "register_runtime_module"]

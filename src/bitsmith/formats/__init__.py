"""Codecs, packing and QTensor: pure tensor math, no I/O."""
from .codec import CODECS, Codec, Params, TensorSpec, matrix_shape
from .packing import Packing, pack_bits, unpack_bits
from .qtensor import QTensor

# register the codecs
from . import affine as _affine  # noqa: F401,E402
from . import codebook as _codebook  # noqa: F401,E402
from . import int8 as _int8  # noqa: F401,E402

__all__ = ["CODECS", "Codec", "Params", "TensorSpec", "QTensor", "Packing", "pack_bits", "unpack_bits", "matrix_shape"]

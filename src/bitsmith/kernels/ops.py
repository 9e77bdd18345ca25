"""``torch.compile`` support: each quantized linear layer as one opaque custom op,
``bitsmith::quant_linear``.

Dynamo cannot trace the kernels' host code (cached launch plans, raw device addresses, Triton
launchers), and the torch reference path's unpacking (chunked, in-place, sized by the thread
count) breaks its graph, so a compiled model that reached either would break at every quantized
layer or fail. Under compilation the runtime modules (:class:`bitsmith.nn.QuantLinear`,
:class:`bitsmith.nn.LowRankQuantLinear`, :class:`bitsmith.nn.W8A8Linear`) instead emit
``torch.ops.bitsmith.quant_linear(x, handle)``: Inductor fuses everything around it (norms,
rotary, residual adds, activations) and calls the op, whose implementation is the module's
ordinary eager forward: the fused kernels with their launch plans on CUDA (capturable in a CUDA
graph as uncompiled), the reference path elsewhere. ``handle`` is a small integer naming the
module in a weak registry (the op's schema takes tensors and numbers, not modules), given at
construction (:class:`OpHandleMixin`); the graph keeps it as a constant, and a module that is
deleted leaves the registry by itself.

The op has no backward, so a call that needs a gradient, for its input (adapters trained through
the layer, say) or for a tensor of the module, is traced instead (:func:`opaque`); there, and in
the quantized convolutions, the packed weight's dequantization is itself one op,
``bitsmith::dequantize`` (the float weight of a packed module needs no gradient), and the
``F.linear`` / ``F.conv2d`` around it is traced, so neither breaks the graph.
"""
from __future__ import annotations

import itertools
import weakref

import torch

_MODULES: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def register(module: torch.nn.Module) -> int:
    """Give ``module`` a fresh handle (``module._op_handle``) in the registry; returns it."""
    h = next(_NEXT)
    module.__dict__["_op_handle"] = h
    _MODULES[h] = module
    return h


class OpHandleMixin:
    """For every quantized module (through ``QuantWeightMixin``): a handle from construction
    on, and a fresh one for a copy or an unpickled module (which would otherwise name the
    original and run its weights). The handle is a plain int attribute, which Dynamo reads as a
    constant while tracing ``forward``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        register(self)

    def __setstate__(self, state):  # copy.deepcopy and pickle come through here
        super().__setstate__(state)
        register(self)


def _module(handle: int) -> torch.nn.Module:
    module = _MODULES.get(handle)
    if module is None:
        raise RuntimeError(f"bitsmith ops: module handle {handle} is gone (the module was deleted "
                           "while a compiled graph that calls it is still in use)")
    return module


def _quant_linear_impl(x: torch.Tensor, handle: int) -> torch.Tensor:
    """The registered module's eager forward on ``x`` (a new tensor ``[..., out_features]``)."""
    return _module(handle).eager_forward(x)


def _quant_linear_fake(x: torch.Tensor, handle: int) -> torch.Tensor:
    module = _module(handle)
    fake_output = getattr(module, "fake_output", None)  # a module whose output is strided says so
    return fake_output(x) if fake_output is not None else x.new_empty(*x.shape[:-1], module.out_features)


# Registered through torch.library.Library rather than the custom_op decorator: a call costs
# ~6 us of dispatch on this CI machine against ~19 us (the decorator adds autograd and
# aliasing checks per call), which an uncaptured compiled model pays once per layer. The op has
# no backward: the modules emit it only when no gradient is wanted (:func:`opaque`).
_LIB = torch.library.Library("bitsmith", "DEF")
_LIB.define("quant_linear(Tensor x, int handle) -> Tensor")
_LIB.impl("quant_linear", _quant_linear_impl, "CompositeExplicitAutograd")
torch.library.register_fake("bitsmith::quant_linear", _quant_linear_fake, lib=_LIB)
quant_linear = torch.ops.bitsmith.quant_linear.default


def _dequantize_impl(anchor: torch.Tensor, handle: int, dtype: torch.dtype | None) -> torch.Tensor:
    """The registered module's packed weight dequantized (its torch reference path)."""
    return _module(handle).qweight.dequantize(dtype)


def _dequantize_fake(anchor: torch.Tensor, handle: int, dtype: torch.dtype | None) -> torch.Tensor:
    module = _module(handle)
    return torch.empty(module.weight_shape, dtype=dtype or module.weight_dtype, device=anchor.device)


# The weight alone, for what is traced around it (a convolution, or a linear layer whose input
# needs a gradient): the float weight of a packed module carries no gradient, so this op needs
# no backward either. ``anchor`` is one of the module's packed buffers (it gives the device).
_LIB.define("dequantize(Tensor anchor, int handle, ScalarType? dtype) -> Tensor")
_LIB.impl("dequantize", _dequantize_impl, "CompositeExplicitAutograd")
torch.library.register_fake("bitsmith::dequantize", _dequantize_fake, lib=_LIB)
dequantize = torch.ops.bitsmith.dequantize.default


def opaque(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module``'s ``forward`` on ``x`` emits :data:`quant_linear`: Dynamo is tracing
    it and no gradient is wanted, neither for ``x`` nor for a tensor of the module (an unfrozen
    bias, SVDQuant's factors being fine-tuned), since the op would hide it from autograd."""
    if not torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not (x.requires_grad or any(t.requires_grad for t in itertools.chain(module.parameters(), module.buffers())))


class OpaqueLinearMixin:
    """``forward`` of the quantized linear modules: the module's ``eager_forward``, emitted as
    the one op :data:`quant_linear` under ``torch.compile`` when :func:`opaque` says so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if opaque(self, x):
            return quant_linear(x, self._op_handle)
        return self.eager_forward(x)


__all__ = ["quant_linear", "dequantize", "register", "OpHandleMixin", "OpaqueLinearMixin", "opaque"]

"""Sibling linears run as one matmul: layers that read the same input (a decoder's q/k/v
projections, its gate/up projections) stacked along their outputs into one runtime weight.

At batch 1 a decoder's small projections cost little to read and much to launch: on the H100 a
1024x4096 int4 matmul took about as long as a 4096x4096 one, and q, k and v together took longer
than the same weight as one 6144x4096 matmul (``benchmarks/results/kernels_configs_m1.json``).
A :class:`SiblingGroup` keeps its members as they are (their modules, names, state dict and
checkpoint are unchanged) and holds one extra thing, the runtime layout of their weights
stacked (:func:`bitsmith.kernels.layout.repack_stacked`); the members drop their own runtime
weights, so the GPU holds no second copy.

The first member called with an input runs the stacked matmul and keeps its siblings' slices
of the output; each sibling called next with the same input tensor (the same object, not
modified in place since) takes its slice instead of computing. A member called with any other
input runs the stacked matmul again, so the order of the calls does not matter and nothing
stale is returned. Only the fused-kernel path is grouped: an input the kernels do not take
(CPU, float32, one that needs a gradient) runs each member's own reference path, exactly as
before fusing. A member's output from the group is a slice of the stacked output (its rows are
``sum(out_features)`` apart); ``torch.compile`` is told the same strides
(:meth:`SiblingGroup.fake_output`).

The stacked weight and bias are copies made when the group is prepared (when every member's
weight is on the same CUDA device, and again after a move or a ``load_state_dict``); change a
member's weight by unfusing first (:func:`unfuse`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QuantizationError
from ..kernels import RuntimeWeight, quant_matmul, reserve_workspace
from ..kernels.layout import repack_stacked, stack_reason

_ATTR = "_sibling_group"


@dataclass
class _Pending:
    """The siblings' slices of one stacked output, waiting for their modules' calls."""

    x: torch.Tensor
    version: int
    outputs: list[torch.Tensor | None]


class SiblingGroup:
    """Member modules (QuantLinear) that read the same input, run as one stacked matmul."""

    # where the stacked weight is built (the kernels' devices; the CPU tests add "cpu" under
    # Triton's interpreter)
    device_types: tuple[str, ...] = ("cuda",)

    def __init__(self, members: list, names: list[str] | None = None):
        self.members = list(members)
        self.names = list(names) if names is not None else [f"member {i}" for i in range(len(self.members))]
        self.sizes = [int(m.out_features) for m in self.members]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.out_features = sum(self.sizes)
        self.runtime: RuntimeWeight | None = None
        self.bias: torch.Tensor | None = None
        self._pending: _Pending | None = None

    def __repr__(self) -> str:
        return f"SiblingGroup({', '.join(self.names)}; {self.out_features} outputs)"

    def index(self, member) -> int:
        return next(i for i, m in enumerate(self.members) if m is member)

    def prepare(self) -> RuntimeWeight | None:
        """Stack the members' weights into one runtime weight on their device, once all of them
        are on the same CUDA device (a member moved alone waits for its siblings); returns it or
        ``None``."""
        devices = {m.qweight.device for m in self.members}
        if len(devices) != 1 or next(iter(devices)).type not in self.device_types:
            self.invalidate()
            return None
        device = next(iter(devices))
        if self.runtime is not None and self.runtime.device == device:
            return self.runtime
        self.invalidate()  # the old device's copy goes before the new one is built
        self.runtime = repack_stacked([m.qweight for m in self.members], layout=self.members[0].kernel_layout)
        reserve_workspace(self.runtime)
        self.bias = self._stacked_bias(device)
        return self.runtime

    def invalidate(self) -> None:
        """Forget the stacked weight (a member's buffers changed); the next call re-stacks."""
        self.runtime, self.bias, self._pending = None, None, None

    def _stacked_bias(self, device: torch.device) -> torch.Tensor | None:
        if all(m.bias is None for m in self.members):
            return None
        parts = [m.bias.detach() if m.bias is not None else torch.zeros(n, device=device)
                 for m, n in zip(self.members, self.sizes)]
        dtype = next(m.bias.dtype for m in self.members if m.bias is not None)
        return torch.cat([p.to(device=device, dtype=dtype) for p in parts])

    def takes(self, member, x: torch.Tensor) -> bool:
        """Whether ``member``'s call on ``x`` runs in the group: the fused kernels take ``x`` and
        the stacked weight is on ``x``'s device (prepared now if it can be, outside a capture)."""
        if not member._kernel_input(x):
            return False
        if self.runtime is None and not torch.compiler.is_compiling() and not (
                x.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.prepare()
        return self.runtime is not None and self.runtime.device == x.device

    def output(self, member, x: torch.Tensor) -> torch.Tensor:
        """``member``'s output on ``x`` (its slice of the stacked output; see the module docstring)."""
        i = self.index(member)
        pending = self._pending
        if pending is not None and pending.x is x and pending.version == x._version and pending.outputs[i] is not None:
            y, pending.outputs[i] = pending.outputs[i], None
            if all(o is None for o in pending.outputs):
                self._pending = None
            return y
        outputs: list[torch.Tensor | None] = list(quant_matmul(x, self.runtime, self.bias).split(self.sizes, dim=-1))
        y, outputs[i] = outputs[i], None
        self._pending = _Pending(x, x._version, outputs)
        return y

    def fake_output(self, member, x: torch.Tensor) -> torch.Tensor:
        """An empty tensor with the shape and strides :meth:`output` returns (for torch.compile)."""
        i = self.index(member)
        return x.new_empty(*x.shape[:-1], self.out_features).narrow(-1, self.offsets[i], self.sizes[i])


def fuse(members: list, names: list[str] | None = None) -> SiblingGroup:
    """Group ``members`` (QuantLinear modules that read the same input, in the order their
    outputs are stacked). Raises :class:`~bitsmith.errors.QuantizationError` naming the member
    that cannot join: not a plain QuantLinear, already grouped, a weight the kernels do not take
    or one that cannot stack with the first (another format, group size or in_features)."""
    from .quant_linear import QuantLinear

    names = list(names) if names is not None else [f"member {i}" for i in range(len(members))]
    if len(members) < 2:
        raise QuantizationError(f"fusing {names}: a group needs at least two members")
    for m, name in zip(members, names):
        if type(m) is not QuantLinear:
            raise QuantizationError(f"fusing {names}: {name} is a {type(m).__name__}, not a QuantLinear")
        if m.__dict__.get(_ATTR) is not None:
            raise QuantizationError(f"fusing {names}: {name} is already in a sibling group")
        if m.kernel_layout != members[0].kernel_layout:
            raise QuantizationError(f"fusing {names}: {name} pins the runtime layout {m.kernel_layout!r}, "
                                    f"{names[0]} {members[0].kernel_layout!r}")
    reason = stack_reason([m.qweight for m in members])
    if reason is not None:
        raise QuantizationError(f"fusing {names}: {reason}")
    group = SiblingGroup(members, names)
    for m in members:
        m.__dict__[_ATTR] = group
        m.prepare_kernels()  # drops the member's own runtime weight
    group.prepare()
    return group


def unfuse(group: SiblingGroup) -> None:
    """Give every member back its own runtime weight (on CUDA) and drop the stacked one."""
    group.invalidate()
    for m in group.members:
        m.__dict__.pop(_ATTR, None)
        m.__dict__.pop("kernel_skip_reason", None)
        m.__dict__["_runtime"] = None
        if m.qweight.device.type == "cuda" and m.use_kernels:
            m.prepare_kernels()


def sibling_group(module) -> SiblingGroup | None:
    """The group ``module`` runs in, or ``None``."""
    return module.__dict__.get(_ATTR)


__all__ = ["SiblingGroup", "fuse", "unfuse", "sibling_group"]

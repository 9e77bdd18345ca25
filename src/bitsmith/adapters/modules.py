"""LoRA and DoRA adapters around a packed, frozen bitsmith runtime module.

Notation. The wrapped module (``QuantLinear``, ``QuantConv2d``, ``W8A8Linear``: any module with a
packed weight that offers ``dequantize(dtype)``, ``weight_shape`` and ``bias``) computes
``y = W x + b`` (``W8A8Linear`` up to its activation quantization; its ``W`` is the dequantized
weight divided by its ``migration_scale``, see :func:`effective_weight`). Its
weight ``W`` is read as the matrix ``[out, k]`` : ``k = in`` for a Linear, ``k = in*kh*kw`` for a
Conv2d (``W.flatten(1)``). The adapter holds

* ``A`` ``[r, k]`` (``lora_A``: a ``Linear(in, r)``, or for a conv a ``Conv2d(in, r)`` with the
  base's kernel, stride, padding and dilation) and ``B`` ``[out, r]`` (``lora_B``: a
  ``Linear(r, out)`` or a 1x1 ``Conv2d(r, out)``), so that ``B(A(x)) = (B·A) x`` with ``B·A``
  the ``[out, k]`` matrix (reshaped to the conv kernel for a conv);
* the scaling ``s = alpha / r``;
* for DoRA, the magnitude ``m`` ``[out]``, initialised to the row norms of the dequantized ``W``.

LoRA:  ``y = base(x) + s · B A drop(x)``.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5): the adapted
weight is ``W' = m ⊙ (W + s·B·A) / ||W + s·B·A||_c``, where ``||·||_c`` is the L2 norm of each
output unit's weight vector (a row of our ``[out, k]`` matrix; the paper's "column", its ``W`` being
``[k, out]``). As the paper advises (section 4.3), the norm is treated as a constant: detached, it
gets no gradient. The forward never forms ``W'``: the base runs through the packed module and the
low-rank path is added before rescaling,

    ``y = (m / n) ⊙ (base(x) − b + s · B A drop(x)) + b``,   ``n = ||W + s·B·A||_c`` (detached).

Dropout (if any) applies to the low-rank path's input only; with ``dropout=0`` the forward is
exactly ``W' x + b``.

How ``n`` is computed (float32, never keeping a float copy of ``W``):

* training on a ``QuantLinear``: from ``n_i² = ||W_i||² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·(B G Bᵀ)_ii`` with
  ``G = A Aᵀ`` ``[r, r]``. ``||W_i||²`` (``[out]``) is computed once from ``dequantize`` and kept;
  ``W Aᵀ`` comes from the same base call as the output: the ``r`` rows of ``A`` (detached) are
  appended to the batch, so a training step dequantizes the packed weight once, through the
  module's own forward (and whatever kernel it dispatches to);
* otherwise (evaluation, other bases, ``merge``): directly, ``||W + s·B·A||_c`` from
  ``dequantize(float32)``, cached until ``A``, ``B`` or the base's buffers change or the module
  is put in training mode.

Keeping the dequantized base weight (``keep_base_weight``, off by default; on with
:func:`bitsmith.adapters.keep_base_weights`): on a ``QuantLinear`` base the adapter then computes
the base output itself, ``F.linear(x, W, b)`` with ``W = dequantize(x.dtype)`` (exactly the
module's reference path), and keeps ``W`` between calls until the base's buffers change, the
module is moved or ``train()``/``eval()`` is called. The base is frozen, so a training run
dequantizes each weight once instead of once per step; the price is a float copy of ``W`` per
module (what QLoRA-style training avoids; worth it on a CPU, where the dequantization of all
weights costs about as much as a small batch's matmuls). DoRA's ``W Aᵀ`` then comes from
``F.linear(A, W)`` instead of riding along in the batch.

Only ``lora_A``, ``lora_B`` (and ``magnitude``) require grad; the base's parameters (its float
bias) are frozen. Gradients flow to the input through both paths. Adapter parameters have their
own dtype (default float32); in bf16/fp16 compute the low-rank path runs in the adapter dtype and
the result is cast back to the input's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizationError
from ..nn import QuantLinear

#: the adapter kinds, by the name saved in adapter files
ADAPTER_KINDS: dict[str, type["LoraAdapter"]] = {}


def _register(kind: str):
    def deco(cls):
        cls.kind = kind
        ADAPTER_KINDS[kind] = cls
        return cls

    return deco


#: buffers of runtime modules whose forward is more than ``W x + b`` with ``W`` from ``dequantize``
#: (SVDQuant's low-rank branch, smoothing and shift): adapters there would compute a wrong norm/merge
_NOT_PLAIN_BUFFERS = ("lora_up", "lora_down", "smooth", "shift")


def is_packed_module(module: nn.Module) -> bool:
    """A runtime module whose weight is stored packed: it can dequantize its weight and says the
    weight's shape (``QuantLinear``, ``QuantConv2d``, ``W8A8Linear``)."""
    return (
        not isinstance(module, LoraAdapter)
        and callable(getattr(module, "dequantize", None))
        and isinstance(getattr(module, "weight_shape", None), tuple)
    )


def effective_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``base`` applies to its input: ``dequantize(dtype)``, with the columns
    divided by ``migration_scale`` when the module keeps one (an unfused SmoothQuant layer
    computes ``W' (x / s)``, i.e. ``W = W' / s``)."""
    w = base.dequantize(dtype)
    migration = getattr(base, "migration_scale", None)
    if migration is not None:
        w = w / migration.to(dtype).reshape(1, -1, *([1] * (w.dim() - 2)))
    return w


def _module_device(module: nn.Module) -> torch.device:
    for t in (*module.buffers(), *module.parameters()):
        return t.device
    return torch.device("cpu")


def _low_rank_pair(base: nn.Module, r: int, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """``(A, B)`` modules shaped for ``base``: Linear pair for a linear base, conv pair for a conv."""
    shape = tuple(base.weight_shape)
    if hasattr(base, "kernel_size"):  # a conv: weight [out, in/groups, kh, kw]
        if getattr(base, "groups", 1) != 1:
            raise QuantizationError(f"adapters on a grouped conv (groups={base.groups}) are not supported")
        out_ch, in_ch = shape[0], shape[1]
        a = nn.Conv2d(
            in_ch, r, base.kernel_size, stride=base.stride, padding=base.padding, dilation=base.dilation,
            bias=False, padding_mode=getattr(base, "padding_mode", "zeros"), device=device, dtype=dtype,
        )
        b = nn.Conv2d(r, out_ch, 1, bias=False, device=device, dtype=dtype)
        return a, b
    if len(shape) != 2:
        raise QuantizationError(f"adapters need a 2-D (linear) or 4-D (conv) packed weight, got shape {list(shape)}")
    out_f, in_f = shape
    a = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)
    b = nn.Linear(r, out_f, bias=False, device=device, dtype=dtype)
    return a, b


@_register("lora")
class LoraAdapter(nn.Module):
    """``y = base(x) + s · B A drop(x)`` on a packed, frozen ``base`` (see the module docstring).

    ``alpha`` defaults to ``r`` (``s = 1``). ``A`` starts Kaiming-uniform and ``B`` at zero, so a
    fresh adapter computes exactly what the base does."""

    kind = "lora"
    #: keep the dequantized base weight between calls (QuantLinear bases; see the module docstring)
    keep_base_weight: bool = False

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not is_packed_module(base):
            raise QuantizationError(
                f"an adapter needs a bitsmith runtime module with a packed weight (QuantLinear, QuantConv2d, W8A8Linear), "
                f"got {type(base).__name__}"
            )
        extra = [n for n in _NOT_PLAIN_BUFFERS if n in getattr(base, "_buffers", {})]
        if extra:
            raise QuantizationError(
                f"{type(base).__name__} computes more than W x + b (it has {', '.join(extra)}); adapters need a "
                "runtime module whose forward applies its dequantized weight (QuantLinear, QuantConv2d, W8A8Linear)"
            )
        if not (isinstance(r, int) and r >= 1):
            raise QuantizationError(f"adapter rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise QuantizationError(f"adapter dropout must be in [0, 1), got {dropout!r}")
        if not dtype.is_floating_point:
            raise QuantizationError(f"adapter dtype must be floating, got {dtype}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = self.alpha / r
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = _low_rank_pair(base, r, dtype, _module_device(base))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        #: the base computes exactly ``F.linear(x, dequantize(x.dtype), b)`` (its reference path)
        self.plain_linear_base = isinstance(base, QuantLinear)
        self._base_weight_cache: tuple[tuple, torch.Tensor] | None = None

    # --- the pieces ------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return int(self.base.weight_shape[0])

    def _state_key(self, with_adapter: bool = True) -> tuple:
        """Changes whenever ``A``, ``B`` (``with_adapter``) or the base's stored tensors change
        (in place or replaced). Writes through ``.data`` bypass version counters: call
        ``train()`` (which drops the caches) after such a write."""
        tensors = (*((self.lora_A.weight, self.lora_B.weight) if with_adapter else ()), *self.base.buffers())
        return tuple((t.data_ptr(), t._version, t.device) for t in tensors)

    def _keeps_base_weight(self) -> bool:
        return self.keep_base_weight and self.plain_linear_base

    @torch.no_grad()
    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base's ``dequantize(dtype)`` ``[out, in]``, kept until the base changes (see
        ``keep_base_weight``; without it, a fresh dequantization)."""
        if not self._keeps_base_weight():
            return self.base.dequantize(dtype)
        key = (*self._state_key(with_adapter=False), dtype)
        if self._base_weight_cache is None or self._base_weight_cache[0] != key:
            self._base_weight_cache = None  # free the old copy before making the new one
            self._base_weight_cache = (key, self.base.dequantize(dtype))
        return self._base_weight_cache[1]

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)``; with ``keep_base_weight`` on a QuantLinear, ``F.linear`` on the kept weight
        (the same numbers as the module's reference path)."""
        if not self._keeps_base_weight():
            return self.base(x)
        return F.linear(x, self.base_weight(x.dtype), self._bias(x.dtype))

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B A drop(x)`` in the adapter's dtype."""
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s · B·A`` in the base weight's shape (``[out, in]`` or ``[out, in, kh, kw]``)."""
        a = self.lora_A.weight.to(dtype).flatten(1)
        b = self.lora_B.weight.to(dtype).flatten(1)
        return (b @ a).mul_(self.scaling).reshape(self.base.weight_shape)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        bias = getattr(self.base, "bias", None)
        return None if bias is None else bias.to(dtype)

    def _per_channel(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A per-output vector shaped to broadcast over ``y`` (last dim for a linear, dim 1 for a conv)."""
        return v.view(-1, 1, 1) if y.dim() >= 3 and hasattr(self.base, "kernel_size") else v

    # --- what users call -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        return y + self.low_rank(x).to(y.dtype)

    @torch.no_grad()
    def merge(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this layer computes with: ``W + s·B·A`` (in the base weight's shape)."""
        w = effective_weight(self.base, torch.float32)
        return (w + self.delta_weight(torch.float32)).to(dtype)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self._base_weight_cache = None  # device / dtype moves: dequantize again on the new device
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):  # type: ignore[override]
        self._base_weight_cache = None
        return super().train(mode)

    def adapter_config(self) -> dict:
        """What the adapter file records for this module."""
        return {"kind": self.kind, "r": self.r, "alpha": self.alpha, "dropout": self.dropout_p}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, alpha={self.alpha:g}, dropout={self.dropout_p:g}, dtype={self.lora_A.weight.dtype}"


@_register("dora")
class DoraAdapter(LoraAdapter):
    """DoRA on a packed, frozen ``base``:
    ``y = (m / n) ⊙ (base(x) − b + s · B A drop(x)) + b`` with ``n = ||W + s·B·A||_c`` detached
    (see the module docstring). ``m`` (``magnitude``) starts at ``||W||_c``, so a fresh adapter
    computes what the base does."""

    kind = "dora"

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(base, r, alpha, dropout, dtype)
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None
        self._w_sq_cache: tuple[tuple, torch.Tensor] | None = None
        #: QuantLinear computes exactly ``W x + b`` row by row: ``W Aᵀ`` can ride along in its call
        #: (a conv cannot; W8A8Linear would quantize the rows of A: both take the direct path)
        self.rows_through_base = self.plain_linear_base
        self.magnitude = nn.Parameter(self.weight_norm().to(dtype))

    @torch.no_grad()
    def base_row_sq_norms(self) -> torch.Tensor:
        """``||W_i||²`` float32 ``[out]``, computed once (and again if the base changes)."""
        key = self._state_key(with_adapter=False)
        if self._w_sq_cache is None or self._w_sq_cache[0] != key:
            w = self.base_weight(torch.float32) if self._keeps_base_weight() else effective_weight(self.base, torch.float32)
            self._w_sq_cache = (key, w.reshape(w.shape[0], -1).square().sum(dim=1))
        return self._w_sq_cache[1]

    @torch.no_grad()
    def norm_from_projection(self, wa: torch.Tensor) -> torch.Tensor:
        """``n`` from ``wa = W Aᵀ`` ``[out, r]`` (see the module docstring), float32 ``[out]``."""
        a = self.lora_A.weight.detach().float().flatten(1)
        b = self.lora_B.weight.detach().float().flatten(1)
        s = self.scaling
        sq = self.base_row_sq_norms() + (2 * s) * (b * wa.float()).sum(dim=1) + (s * s) * ((b @ (a @ a.T)) * b).sum(dim=1)
        return sq.clamp_min_(0).sqrt_()

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``n = ||W + s·B·A||_c``: float32 ``[out]``, no gradient. The packed weight is
        dequantized for this and dropped; the result is cached until A, B or the base change."""
        key = self._state_key()
        if self._norm_cache is not None and self._norm_cache[0] == key:
            return self._norm_cache[1]
        w = self.base_weight(torch.float32) if self._keeps_base_weight() else effective_weight(self.base, torch.float32)
        w = w.reshape(w.shape[0], -1) + self.delta_weight(torch.float32).reshape(w.shape[0], -1)
        norm = torch.linalg.vector_norm(w, dim=1)
        del w
        self._norm_cache = (key, norm)
        return norm

    def scale(self) -> torch.Tensor:
        """``m / n`` ``[out]`` (float32 or the adapter dtype if wider); carries ``m``'s gradient."""
        return self.magnitude / self.weight_norm()

    def _base_and_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base(x), n)``; in training on a QuantLinear, one base call gives both."""
        if not (self.training and self.rows_through_base):
            return self.base_forward(x), self.weight_norm()
        if self._keeps_base_weight():
            w = self.base_weight(x.dtype)
            with torch.no_grad():
                wa = F.linear(self.lora_A.weight.detach().to(x.dtype), w)
            return F.linear(x, w, self._bias(x.dtype)), self.norm_from_projection(wa.T)
        rows = x.reshape(-1, x.shape[-1])
        a_rows = self.lora_A.weight.detach().to(x.dtype)
        y_all = self.base(torch.cat([rows, a_rows]))
        y, wa = y_all[: rows.shape[0]], y_all[rows.shape[0] :].detach()
        bias = self._bias(wa.dtype)
        if bias is not None:
            wa = wa - bias
        return y.reshape(*x.shape[:-1], y.shape[-1]), self.norm_from_projection(wa.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, norm = self._base_and_norm(x)
        compute = torch.promote_types(y.dtype, self.lora_A.weight.dtype)
        bias = self._bias(compute)
        core = y.to(compute) + self.low_rank(x).to(compute)
        if bias is not None:
            core = core - self._per_channel(bias, core)
        out = core * self._per_channel((self.magnitude / norm).to(compute), core)
        if bias is not None:
            out = out + self._per_channel(bias, out)
        return out.to(y.dtype)

    @torch.no_grad()
    def merge(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this layer computes with: ``(m / n) ⊙ (W + s·B·A)``."""
        w = effective_weight(self.base, torch.float32) + self.delta_weight(torch.float32)
        scale = self.scale().float()
        return (w * scale.view(-1, *([1] * (w.dim() - 1)))).to(dtype)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self._norm_cache = self._w_sq_cache = None  # device / dtype moves: recompute on the new device
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):  # type: ignore[override]
        self._norm_cache = None
        return super().train(mode)

"""``layer.weight`` for converted layers: code written for ``nn.Linear`` keeps working.

Converted layers (`LowRankLinear`, `Int8Linear`) store what their kernels read — ``U`` and
``V``, or ``qweight`` and ``scales`` — and no dense weight. Code in the wild reads ``.weight``
anyway: dtype/device probes (``layer.weight.dtype``), ``nn.MultiheadAttention``, which passes
``out_proj.weight`` to ``F.multi_head_attention_forward`` instead of calling ``out_proj``, and
the fused inference paths of ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``, which
read ``linear1.weight`` and friends and call one fused C++ op with them.

The design (the choice, and why)
--------------------------------
Two designs were on the table: (a) the weight as a tensor subclass that sends ``F.linear`` to
our kernel and everything else to a dense materialisation (torchao's way), or (b) a plain
``.weight`` property returning the dense matrix. This module does (a) *as a view*: the
subclass is never a parameter or a buffer, it is built on each read of the property, from the
layer's real state, and holds no storage (a wrapper subclass: shape, dtype, device and
requires_grad only). So:

- ``state_dict``, ``parameters()``, optimizers, ``.to()``/``.half()``, checkpoints and
  `lrkernels.nn.save_compressed` see only ``U``/``V``/``bias`` or ``qweight``/``scales``/
  ``bias``: nothing to serialise specially, no subclass in a safetensors file;
- probes are free: ``weight.dtype``, ``.shape``, ``.device``, ``.requires_grad``, ``.ndim``,
  ``.size()`` answer from metadata without computing anything;
- ``F.linear(x, layer.weight, b)`` runs our kernel (`lrkernels.lowrank_linear` /
  `lrkernels.int8_linear`) with that bias: no dense weight is formed;
- any other use (``weight.T``, ``weight @ x``, ``torch.cat``, ``F.multi_head_attention_forward``)
  gets the dense matrix ``U @ V`` (differentiable: gradients reach U and V) or
  ``dequantize(qweight, scales)`` (frozen: no gradient, as the int8 weight itself);
- because the view has a ``__torch_function__``, ``torch.overrides.has_torch_function`` is
  true for it, so the fused fast paths of ``nn.TransformerEncoderLayer`` and
  ``nn.MultiheadAttention`` step aside and the module path runs — calling ``linear1``/
  ``linear2`` (our kernels) and ``F.multi_head_attention_forward`` (``out_proj`` dense, see
  below). With (b) those fast paths would silently run dense on every call, undoing the
  compression's memory and speed in exactly the inference setting they exist for;
- in-place use (``weight.data.normal_()``, ``weight.copy_(w)``, ``init.xavier_uniform_``,
  ``weight.requires_grad_(False)``) raises: writing into a dense copy would silently change
  nothing.

Under torch.compile (dynamo tracing), the property returns the dense materialisation instead
(tracing a subclass created inside the graph is not supported across torch 2.11–2.15): the
graph then computes ``U @ V`` only where ``.weight`` is actually used, and inductor removes it
where it is not (dtype probes, fast-path checks). The compiled module path still calls our
kernels for the layers' own forward.

Limits: ``nn.MultiheadAttention`` computes its output projection inside
``F.multi_head_attention_forward``, which we do not rewrite: an ``out_proj`` converted there is
stored compressed but computed densely (``U @ V`` or the dequantized weight, formed per call).
``layer.weight.grad`` is always None (the gradients are on ``U``/``V``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["DenseWeightView", "DenseWeightMixin"]

# Tensor attributes answered from the view's own metadata (no materialisation).
_METADATA_PROPERTIES = (
    "dtype", "shape", "device", "requires_grad", "is_leaf", "grad_fn", "grad", "ndim", "layout",
    "is_cuda", "is_cpu", "is_meta", "is_mps", "is_xpu", "is_sparse", "is_quantized", "is_nested",
    "is_mkldnn", "names", "itemsize", "output_nr", "_version", "_base",
)  # fmt: skip
_METADATA_METHODS = (
    "size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
    "is_contiguous", "get_device", "stride", "__len__", "__hash__", "is_signed",
)  # fmt: skip


def _getters() -> frozenset:
    found = []
    for name in _METADATA_PROPERTIES:
        attr = getattr(torch.Tensor, name, None)
        if attr is not None and hasattr(attr, "__get__"):
            found.append(attr.__get__)
    for name in _METADATA_METHODS:
        attr = getattr(torch.Tensor, name, None)
        if attr is not None:
            found.append(attr)
    return frozenset(found)


_PASSTHROUGH = _getters()
_DATA_GETTER = torch.Tensor.data.__get__
_INPLACE_DUNDERS = frozenset(
    f"__i{op}__"
    for op in (
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "and",
        "or",
        "xor",
        "lshift",
        "rshift",
        "matmul",
    )  # fmt: skip
) | {"__setitem__", "__set__", "__delete__"}


def _writes(func) -> bool:
    name = getattr(func, "__name__", "")
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))


class DenseWeightView(Tensor):
    """The dense weight ``(out_features, in_features)`` of a converted layer, as a read-only
    view (module docstring). ``F.linear(x, view, bias)`` runs the layer's kernel; other ops see
    ``owner._dense_weight()``."""

    _owner: torch.nn.Module

    @staticmethod
    def __new__(cls, owner, dtype: torch.dtype, device: torch.device, requires_grad: bool):
        view = Tensor._make_wrapper_subclass(
            cls,
            (owner.out_features, owner.in_features),
            dtype=dtype,
            device=device,
            requires_grad=requires_grad,
        )
        view._owner = owner
        return view

    def __init__(self, *args, **kwargs) -> None:  # everything happens in __new__
        pass

    def __repr__(self, *, tensor_contents=None) -> str:
        owner = type(self._owner).__name__
        return (
            f"DenseWeightView({owner}.weight, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, requires_grad={self.requires_grad})"
        )

    def materialize(self) -> Tensor:
        """The dense weight as an ordinary tensor (attached to autograd when the view
        requires grad, detached otherwise)."""
        dense = self._owner._dense_weight()
        return dense if self.requires_grad else dense.detach()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PASSTHROUGH:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func == _DATA_GETTER:
            (view,) = args
            return cls(view._owner, view.dtype, view.device, requires_grad=False)
        if _writes(func) or any(isinstance(t, cls) for t in _out_tensors(kwargs)):
            owner = next(a._owner for a in _flat(args, kwargs) if isinstance(a, cls))
            raise RuntimeError(
                f"{type(owner).__name__}.weight is a read-only view computed from the layer's "
                f"{owner._weight_source()}; {getattr(func, '__name__', func)} cannot modify it "
                "(it would change a temporary copy). Change the layer's own tensors instead."
            )
        if func is F.linear and all(t is cls or t is Tensor for t in types):
            x, weight, bias = _linear_args(args, kwargs)
            if type(weight) is cls and not isinstance(x, cls) and not isinstance(bias, cls):
                return weight._owner._linear_with(x, bias)
        args, kwargs = tree_map(_materialize, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only when torch functions are disabled around a call (a handler above ours):
        # below autograd, so a gradient for U/V could not be recorded here.
        views = [a for a in _flat(args, kwargs or {}) if isinstance(a, cls)]
        if torch.is_grad_enabled() and any(v.requires_grad for v in views):
            raise RuntimeError(
                f"{type(views[0]._owner).__name__}.weight reached {func} below autograd; its "
                "gradient could not reach the layer's factors. Call the layer instead."
            )
        args, kwargs = tree_map(_materialize_detached, (args, kwargs or {}))
        return func(*args, **kwargs)


def _flat(args, kwargs) -> list:
    return [*torch.utils._pytree.tree_leaves(args), *torch.utils._pytree.tree_leaves(kwargs)]


def _out_tensors(kwargs) -> list:
    out = kwargs.get("out")
    if out is None:
        return []
    return list(out) if isinstance(out, tuple | list) else [out]


def _materialize(a):
    return a.materialize() if isinstance(a, DenseWeightView) else a


def _materialize_detached(a):
    return a._owner._dense_weight().detach() if isinstance(a, DenseWeightView) else a


def _linear_args(args, kwargs):
    names = ("input", "weight", "bias")
    values = list(args) + [None] * (3 - len(args))
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs[name]
    return values[0], values[1], values[2]


class DenseWeightMixin:
    """Gives a converted layer the ``weight`` property (a `DenseWeightView`, or the dense
    tensor while torch.compile traces). The layer provides ``in_features``, ``out_features``
    and:

    - ``_dense_weight() -> Tensor``: the dense ``(out, in)`` weight, differentiable where
      the layer trains its weight;
    - ``_linear_with(x, bias) -> Tensor``: ``F.linear(x, W, bias)`` through the layer's kernel;
    - ``_weight_meta() -> (dtype, device, requires_grad)``;
    - ``_weight_source() -> str``: what the weight is computed from (for messages).
    """

    @property
    def weight(self) -> Tensor:
        """The dense ``(out_features, in_features)`` weight, for code written for
        ``nn.Linear`` (see `lrkernels.nn._weight`). Not a parameter: never in ``state_dict``
        or ``parameters()``; read-only."""
        if torch.compiler.is_compiling():
            return self._dense_weight()
        dtype, device, requires_grad = self._weight_meta()
        return DenseWeightView(self, dtype, device, requires_grad)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__}.weight is computed from the layer's "
                f"{self._weight_source()} and cannot be assigned (tied weights: convert the "
                "layer back to nn.Linear first, or leave it dense)"
            )
        super().__setattr__(name, value)

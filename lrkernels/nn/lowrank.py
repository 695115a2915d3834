"""Low-rank linear modules and model converters (re-exported by `lrkernels.nn`).

- `LowRankLinear`: ``y = x · (U·V)ᵀ + bias`` with ``U`` (out, rank) and ``V`` (rank, in),
  computed by `lrkernels.lowrank_linear` without forming ``U·V``.
- `LowRankLinear.from_linear`: factorise a trained ``nn.Linear`` (truncated SVD, or
  activation-aware SVD from calibration inputs; see `lrkernels.factorize`).
- `factorize_linears`: replace the ``nn.Linear`` layers of a model in place, optionally
  calibrating every layer on its own inputs, and report what changed (`FactorizeReport`).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import init

from ..factorize import (
    DEFAULT_DAMPING,
    GramAccumulator,
    _validate_rank_args,
    factorize_weight,
    relative_output_error,
    select_rank,
)
from ._walk import NameFilter, calibrate, index_linears, name_predicate, warn_if_nothing_selected
from ._weight import DenseWeightMixin

__all__ = ["FactorizeReport", "LayerReport", "LowRankLinear", "factorize_linears"]


class LowRankLinear(DenseWeightMixin, nn.Module):
    """``y = x · (U·V)ᵀ + bias`` — a drop-in for ``nn.Linear`` whose weight is the rank-``rank``
    product ``U @ V``, evaluated as ``(x · Vᵀ) · Uᵀ`` by `lrkernels.lowrank_linear`.

    Args:
        in_features, out_features: as for ``nn.Linear``.
        rank: inner dimension ``r ≥ 1``; the layer has ``r·(in + out)`` weight parameters
            instead of ``in·out`` (fewer when ``r < in·out / (in + out)``).
        bias: learn an additive bias (out,).
        device, dtype: factory kwargs for the parameters.

    Attributes:
        U: ``(out_features, rank)`` parameter.
        V: ``(rank, in_features)`` parameter.
        bias: ``(out_features,)`` parameter, or None.
        weight: the dense ``U @ V`` ``(out_features, in_features)`` for code written for
            ``nn.Linear`` — a read-only view, not a parameter (`lrkernels.nn._weight`):
            ``F.linear(x, layer.weight, b)`` runs the fused kernel, other uses get the
            product (gradients flow to U and V), probes such as ``layer.weight.dtype`` cost
            nothing, and it is never in the state_dict.
        backend: backend passed to `lrkernels.lowrank_linear` (None = automatic choice).
            A plain attribute, not part of the state_dict.

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``.
    """

    __constants__ = ["in_features", "out_features", "rank"]
    in_features: int
    out_features: int
    rank: int
    U: Tensor
    V: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        for name, value, low in (
            ("in_features", in_features, 0),
            ("out_features", out_features, 0),
            ("rank", rank, 1),
        ):
            if isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            try:
                v = operator.index(value)
            except TypeError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
            if v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")
        self.in_features = operator.index(in_features)
        self.out_features = operator.index(out_features)
        self.rank = operator.index(rank)
        self.backend: str | None = None
        self.U = nn.Parameter(torch.empty((self.out_features, self.rank), **factory_kwargs))
        self.V = nn.Parameter(torch.empty((self.rank, self.in_features), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise so that the product ``W = U·V`` has nn.Linear's weight variance.

        ``nn.Linear`` draws ``W ~ U(−1/√in, 1/√in)``, variance ``1/(3·in)``. Here
        ``V ~ U(−1/√in, 1/√in)`` (variance ``1/(3·in)``) and ``U ~ U(−√(3/r), √(3/r))``
        (variance ``1/r``); with independent zero-mean entries
        ``Var(W_ij) = Σ_k Var(U_ik)·Var(V_kj) = r · (1/r) · 1/(3·in) = 1/(3·in)``.
        (W is not uniform, but its variance, hence the output scale, matches.) The
        intermediate ``x·Vᵀ`` thus has the scale of an nn.Linear output. The bias is drawn
        like nn.Linear's, ``U(−1/√in, 1/√in)``.
        """
        bound_v = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        init.uniform_(self.V, -bound_v, bound_v)
        bound_u = math.sqrt(3.0 / self.rank)
        init.uniform_(self.U, -bound_u, bound_u)
        if self.bias is not None:
            init.uniform_(self.bias, -bound_v, bound_v)

    def forward(self, input: Tensor) -> Tensor:
        return self._linear_with(input, self.bias)

    # --- what `DenseWeightMixin` (the ``weight`` property) needs
    def _linear_with(self, input: Tensor, bias: Tensor | None) -> Tensor:
        from ..ops.lowrank import lowrank_linear

        return lowrank_linear(input, self.U, self.V, bias, backend=self.backend)

    def _dense_weight(self) -> Tensor:
        return self.U @ self.V

    def _weight_meta(self) -> tuple[torch.dtype, torch.device, bool]:
        return self.U.dtype, self.U.device, self.U.requires_grad or self.V.requires_grad

    def _weight_source(self) -> str:
        return "factors U and V"

    def extra_repr(self) -> str:
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    @property
    def parameter_count(self) -> int:
        """``rank·(in + out)`` (+ ``out`` with bias)."""
        n = self.rank * (self.in_features + self.out_features)
        return n + (self.out_features if self.bias is not None else 0)

    @property
    def dense_parameter_count(self) -> int:
        """Parameters of the equivalent ``nn.Linear``: ``in·out`` (+ ``out`` with bias)."""
        n = self.in_features * self.out_features
        return n + (self.out_features if self.bias is not None else 0)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` with ``weight = U @ V`` (product accumulated in at least
        float32) and a copy of the bias, on this module's device and dtype."""
        dtype = self.U.dtype
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=dtype,
        ).to_empty(device=self.U.device)
        acc = torch.promote_types(dtype, torch.float32)
        linear.weight.copy_(self.U.to(acc) @ self.V.to(acc))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        linear.train(self.training)
        return linear

    @classmethod
    def from_factors(
        cls,
        U: Tensor,
        V: Tensor,
        bias: Tensor | None = None,
        *,
        backend: str | None = None,
    ) -> LowRankLinear:
        """A module holding copies of ``U`` (out, r), ``V`` (r, in) and ``bias`` (out,), on
        U's device and dtype."""
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(
                f"U (out, rank) and V (rank, in) do not match: {tuple(U.shape)}, {tuple(V.shape)}"
            )
        out_features, rank = U.shape
        in_features = V.shape[1]
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        module = cls(
            in_features, out_features, rank, bias=bias is not None, device="meta", dtype=U.dtype
        ).to_empty(device=U.device)
        with torch.no_grad():
            module.U.copy_(U)
            module.V.copy_(V)
            if bias is not None:
                module.bias.copy_(bias)
        module.backend = backend
        return module

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        *,
        energy: float | None = None,
        ratio: float | None = None,
        calibration: Tensor | None = None,
        gram: Tensor | None = None,
        damping: float = DEFAULT_DAMPING,
        backend: str | None = None,
    ) -> LowRankLinear:
        """Factorise a dense ``nn.Linear`` into a `LowRankLinear`.

        Without ``calibration``/``gram``: truncated SVD of the weight (Eckart–Young optimal,
        ``‖W − U·V‖_F`` minimal). With ``calibration`` inputs (..., in) or their ``gram``
        ``XᵀX`` (in, in): activation-aware SVD minimising ``‖(W − U·V)·Xᵀ‖_F``
        (`lrkernels.factorize.factorize_weight`). Exactly one of ``rank``, ``energy``,
        ``ratio`` (`lrkernels.factorize.select_rank`).

        The result has the linear's device and dtype, a copy of its bias, its training mode
        and its parameters' ``requires_grad`` flags; ``backend`` is stored on the module.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        fac = factorize_weight(
            linear.weight,
            rank,
            energy=energy,
            ratio=ratio,
            calibration=calibration,
            gram=gram,
            damping=damping,
        )
        return cls._from_linear_factors(linear, fac.U, fac.V, backend)

    @classmethod
    def _from_linear_factors(
        cls, linear: nn.Linear, U: Tensor, V: Tensor, backend: str | None
    ) -> LowRankLinear:
        bias = None if linear.bias is None else linear.bias.detach()
        module = cls.from_factors(U, V, bias, backend=backend)
        module.U.requires_grad_(linear.weight.requires_grad)
        module.V.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            module.bias.requires_grad_(linear.bias.requires_grad)
        module.train(linear.training)
        return module


# --------------------------------------------------------------------------------------------
# Model-level conversion
# --------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    """One selected ``nn.Linear``.

    ``rank`` is None when the layer was skipped before a rank was chosen. ``params_*``
    count weight and bias (``params_after == params_before`` for a skipped layer).
    ``relative_error`` is ``‖(W − U·V)·S‖_F / ‖W·S‖_F`` on the layer's calibration Gram
    ``G = S·Sᵀ`` (i.e. ``‖(W − U·V)·Xᵀ‖ / ‖W·Xᵀ‖`` over the calibration inputs), None
    without calibration. ``skipped`` gives the reason a layer was left dense.
    """

    name: str
    in_features: int
    out_features: int
    rank: int | None
    params_before: int
    params_after: int
    relative_error: float | None = None
    skipped: str | None = None

    @property
    def factorized(self) -> bool:
        return self.skipped is None


@dataclass
class FactorizeReport:
    """What `factorize_linears` did: one `LayerReport` per selected layer (in module order),
    and the whole model's parameter count (unique parameters) before and after."""

    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    calibrated: bool = False

    @property
    def factorized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.factorized]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.factorized]

    @property
    def compression(self) -> float:
        """``params_after / params_before`` for the whole model."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def __str__(self) -> str:
        header = ["layer", "in", "out", "rank", "params before", "params after", "rel. err", ""]
        rows = [header]
        for layer in self.layers:
            err = "-" if layer.relative_error is None else f"{layer.relative_error:.3e}"
            rows.append(
                [
                    layer.name,
                    str(layer.in_features),
                    str(layer.out_features),
                    "-" if layer.rank is None else str(layer.rank),
                    f"{layer.params_before:,}",
                    f"{layer.params_after:,}",
                    err,
                    "" if layer.skipped is None else f"skipped: {layer.skipped}",
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = []
        for row in rows:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:], strict=True)]
            lines.append("  ".join(cells + [row[-1]]).rstrip())
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"model: {self.params_before:,} -> {self.params_after:,} parameters "
            f"({self.compression:.1%}); {len(self.factorized)} of {len(self.layers)} "
            f"selected layers factorised" + (", calibrated" if self.calibrated else "")
        )
        return "\n".join(lines)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _linear_params(in_features: int, out_features: int, rank: int | None, bias: bool) -> int:
    w = in_features * out_features if rank is None else rank * (in_features + out_features)
    return w + (out_features if bias else 0)


def factorize_linears(
    model: nn.Module,
    *,
    rank: int | None = None,
    energy: float | None = None,
    ratio: float | None = None,
    include: NameFilter = None,
    exclude: NameFilter = None,
    calibration_batches: Iterable[Any] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    damping: float = DEFAULT_DAMPING,
    require_reduction: bool = True,
    gram_device: torch.device | str | None = None,
    backend: str | None = None,
) -> FactorizeReport:
    """Replace the selected ``nn.Linear`` submodules of ``model`` (in place) by `LowRankLinear`.

    Selection: every ``nn.Linear`` (subclasses included) whose qualified name (as in
    ``model.named_modules()``) passes ``include`` (if given) and not ``exclude`` (if given);
    each is a callable ``name -> bool`` or a regular expression matched with ``re.search``.
    Selected layers are left dense, and reported as skipped, when:

    - its weight is shared with another module (tied weights, e.g. an LM head tied to the
      embedding: factorising would add parameters and break the tie);
    - its parameters are uninitialised (lazy modules);
    - ``require_reduction`` and the chosen rank r does not reduce its parameter count, i.e.
      ``r·(in + out) ≥ in·out``. An integer ``rank`` above a layer's ``min(in, out)`` is
      clamped to it.

    Calibration: with ``calibration_batches`` (an iterable of batches), forward pre-hooks on
    the layers to factorise accumulate each layer's input Gram matrix ``XᵀX`` in float64
    (`GramAccumulator`, on ``gram_device`` or the layer's device; no activations are kept —
    memory is one ``(in, in)`` float64 matrix per layer), while ``forward_fn(model, batch)``
    (default ``model(batch)``) runs for every batch under ``torch.no_grad()``. The hooks are
    removed afterwards, also if a forward raises (and then no layer is replaced). All layers
    are calibrated on the dense model's activations in a single pass. The model's train/eval
    mode is not changed: call ``model.eval()`` first if it has dropout. Layers are then
    factorised with activation-aware SVD (`lrkernels.factorize.factorize_weight`); a layer
    that saw no calibration rows falls back to plain SVD with a warning.

    A module registered under several names is replaced everywhere by one `LowRankLinear`
    (reported under its first name). The ``out_proj`` of an ``nn.MultiheadAttention`` is
    replaced too (MHA reads ``out_proj.weight``, which `LowRankLinear.weight` provides), but
    MHA never calls it, so it sees no calibration inputs: plain SVD, with a warning. A filter
    that selects no layer warns. A calibration error (e.g. a batch of the wrong width) is
    re-raised naming the batch and the layer. Exactly one of ``rank``, ``energy`` (on the whitened
    spectrum when calibrated), ``ratio`` (see `lrkernels.factorize.select_rank`).

    Returns:
        `FactorizeReport` with a row per selected layer and the model's parameter totals.
    """
    _validate_rank_args(rank, energy, ratio)
    include_fn = name_predicate(include, "include")
    exclude_fn = name_predicate(exclude, "exclude")
    if forward_fn is None:

        def forward_fn(m: nn.Module, batch: Any) -> Any:
            return m(batch)

    index = index_linears(model)
    refs, first_name, linears = index.refs, index.first_name, index.linears
    owners = index.owners

    report = FactorizeReport(params_before=_count_params(model))
    todo: list[tuple[nn.Linear, LayerReport, int | None]] = []  # (layer, row, rank or None)
    if isinstance(model, nn.Linear):
        warnings.warn("factorize_linears: the root module itself is not replaced", stacklevel=2)
    for key, layer in linears.items():
        name = first_name[key]
        if include_fn is not None and not include_fn(name):
            continue
        if exclude_fn is not None and exclude_fn(name):
            continue
        has_bias = layer.bias is not None
        lazy = any(
            isinstance(p, nn.parameter.UninitializedParameter)
            for p in (layer.weight, layer.bias)
            if p is not None
        )
        in_f, out_f = (0, 0) if lazy else (layer.in_features, layer.out_features)
        before = 0 if lazy else _linear_params(in_f, out_f, None, has_bias)
        row = LayerReport(name, in_f, out_f, None, before, before)
        report.layers.append(row)
        if lazy:
            row.skipped = "uninitialised (lazy) parameters"
            continue
        if owners.get(id(layer.weight), 0) > 1:
            row.skipped = "weight is shared with another module (tied)"
            continue
        if min(in_f, out_f) < 1:
            row.skipped = "empty weight"
            continue
        layer_rank = None
        if rank is not None or ratio is not None:
            r = min(operator.index(rank), min(in_f, out_f)) if rank is not None else None
            layer_rank = select_rank(out_f, in_f, rank=r, ratio=ratio)
            row.rank = layer_rank
            if require_reduction and layer_rank * (in_f + out_f) >= in_f * out_f:
                row.skipped = f"rank {layer_rank} does not reduce the parameter count"
                continue
        todo.append((layer, row, layer_rank))

    warn_if_nothing_selected("factorize_linears", index, include, exclude, len(report.layers))
    grams: dict[int, GramAccumulator] = {}
    report.calibrated = calibration_batches is not None
    if calibration_batches is not None and todo:
        layers = [(layer, row.name) for layer, row, _ in todo]
        grams = calibrate(
            "factorize_linears", model, layers, calibration_batches, forward_fn,
            gram_device=gram_device,
        )  # fmt: skip

    for layer, row, layer_rank in todo:
        gram = None
        if report.calibrated:
            acc = grams[id(layer)]
            if acc.count == 0:
                why = (
                    " (nn.MultiheadAttention never calls it)"
                    if id(layer) in index.mha_owned
                    else ""
                )
                warnings.warn(
                    f"factorize_linears: layer {row.name!r} saw no calibration inputs{why}; "
                    "using plain truncated SVD",
                    stacklevel=2,
                )
            else:
                gram = acc.gram
        fac = factorize_weight(
            layer.weight,
            layer_rank,
            energy=energy if layer_rank is None else None,
            gram=gram,
            damping=damping,
        )
        row.rank = fac.rank
        in_f, out_f = row.in_features, row.out_features
        if require_reduction and fac.rank * (in_f + out_f) >= in_f * out_f:
            row.skipped = f"rank {fac.rank} does not reduce the parameter count"
            continue
        new = LowRankLinear._from_linear_factors(layer, fac.U, fac.V, backend)
        if gram is not None:
            row.relative_error = relative_output_error(layer.weight, fac.U, fac.V, gram)
        row.params_after = new.parameter_count
        for parent, attr in refs[id(layer)]:
            setattr(parent, attr, new)

    report.params_after = _count_params(model)
    return report

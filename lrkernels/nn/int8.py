"""int8 weight-only linear modules and a model converter (re-exported by `lrkernels.nn`).

- `Int8Linear`: ``y = x · (q·s)ᵀ + bias`` with a frozen int8 weight ``qweight`` (N, K) and
  scales in the activation dtype (per output channel or per group of 32 / 64 / 128 inputs),
  computed by `lrkernels.int8_linear` without materialising the full-precision weight.
- `Int8Linear.from_linear`: quantize a trained ``nn.Linear`` (absmax round-to-nearest,
  optionally with a per-channel clip ratio searched on calibration inputs; see
  `lrkernels.quant`).
- `quantize_linears`: replace the ``nn.Linear`` layers of a model in place and report the
  bytes saved (`QuantizeReport`).

The formats of ``qweight`` / ``scales`` (layout 1, portable; layout 2, packed for the CUDA
kernels) and the reasons the scales are stored in the activation dtype are described in
`lrkernels.quant`. A module runs on either layout; its state_dict always holds layout 1, so
checkpoints stay portable (and layout-1 checkpoints load into packed modules).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..factorize import GramAccumulator
from ..quant import (
    LAYOUT_VERSION,
    PACKED_LAYOUT_VERSION,
    SCALE_DTYPES,
    can_pack,
    dequantize,
    group_size_of,
    layout_of,
    normalize_group_size,
    pack,
    packed_shape,
    quantization_error,
    quantize,
    search_clip_ratio,
    unpack,
    weight_shape,
)
from ._walk import NameFilter, calibrate, index_linears, name_predicate, warn_if_nothing_selected
from ._weight import DenseWeightMixin

__all__ = ["Int8LayerReport", "Int8Linear", "QuantizeReport", "quantize_linears"]


def _check_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if dtype not in SCALE_DTYPES:
        raise ValueError(
            f"{name} must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}"
        )
    return dtype


def _tensor_bytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Int8Linear(DenseWeightMixin, nn.Module):
    """``y = x · Wᵀ + bias`` with ``W = qweight · scales`` stored as int8 — a drop-in for an
    inference-time ``nn.Linear`` at about half the weight bytes of bfloat16.

    Args:
        in_features, out_features: as for ``nn.Linear``.
        bias: keep a trainable additive bias (out,).
        group_size: None for one scale per output channel; 32, 64 or 128 for one scale per
            group of that many input features (must divide in_features).
        device: where the buffers and the bias live.
        dtype: the activation dtype — float16, bfloat16 or float32 — of the scales, the bias,
            the inputs and the outputs. Default: torch's default dtype
            (``torch.get_default_dtype()``, float32 unless changed), as for ``nn.Linear``.

        layout: 1 (plain ``(out, in)`` qweight) or 2 (packed for the CUDA kernels, needs
            ``in_features % 16 == 0``; `lrkernels.quant`).

    Attributes:
        qweight: int8 ``(out_features, in_features)`` buffer (zeros until loaded/quantized), or
            its packed form ``(ceil(out / 32), in / 16, 512)`` when ``layout == 2``.
        scales: ``(out_features,)`` or ``(out_features, in_features // group_size)`` buffer
            in ``dtype`` (ones until loaded/quantized).
        bias: ``(out_features,)`` parameter, or None.
        weight: the dense weight ``dequantize(qweight, scales)`` ``(out_features,
            in_features)`` for code written for ``nn.Linear`` — a read-only view, not a
            parameter or buffer (`lrkernels.nn._weight`): ``F.linear(x, layer.weight, b)``
            runs the int8 kernel, other uses get the dequantized matrix (no gradient), probes
            such as ``layer.weight.dtype`` cost nothing, and it is never in the state_dict.
        group_size: 0 (per channel) or 32 / 64 / 128.
        backend: passed to `lrkernels.int8_linear` (None = automatic choice). A plain
            attribute, not part of the state_dict.

    Layout: `pack` / `unpack` convert in place; moving a packable module to CUDA packs it (the
    CUDA kernels read layout 2 without a copy; a layout-1 weight is packed on every call there),
    and moving a packed one back to the CPU unpacks it (the cpu kernels read layout 1).
    ``state_dict()`` always holds layout 1 (``(out, in)`` qweight, contiguous scales), and
    ``load_state_dict`` takes either layout and converts it to the module's.

    The weight is frozen: ``qweight`` and ``scales`` are buffers, so ``parameters()`` (and any
    optimizer) only sees the bias; gradients flow to the input and the bias. Buffers follow
    ``.to(device)``. ``.to(dtype)`` / ``.half()`` / ``.float()`` convert the scales and the bias
    (qweight stays int8): exact when widening (bfloat16 → float32); narrowing rounds the scales
    and voids the error bound of `lrkernels.quant.quantize` — to change the dtype, quantize the
    dense layer again with ``from_linear(..., dtype=...)``.

    Loading a state_dict adopts the checkpoint's scale dtype: float32 scales loaded into a
    bfloat16 module make it a float32 module (scales and bias), rather than rounding the scales
    to bfloat16 silently (which would void the quantizer's error bound).

    Shapes: input ``(..., in_features)`` in the scales' dtype, output ``(..., out_features)``.
    """

    __constants__ = ["in_features", "out_features", "group_size"]
    in_features: int
    out_features: int
    group_size: int
    qweight: Tensor
    scales: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        layout: int = LAYOUT_VERSION,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            try:
                v = operator.index(value)
            except TypeError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.in_features = operator.index(in_features)
        self.out_features = operator.index(out_features)
        self.group_size = normalize_group_size(group_size, self.in_features)
        if dtype is None:
            dtype = torch.get_default_dtype()
            if dtype not in SCALE_DTYPES:
                raise ValueError(
                    f"Int8Linear: the default dtype is {dtype}, which the int8 kernels do not "
                    "compute in; pass dtype=torch.float16, torch.bfloat16 or torch.float32"
                )
        dtype = _check_dtype(dtype)
        self.backend: str | None = None
        groups = self.in_features // self.group_size if self.group_size else None
        scale_shape = (self.out_features,) if groups is None else (self.out_features, groups)
        if layout not in (LAYOUT_VERSION, PACKED_LAYOUT_VERSION):
            raise ValueError(f"layout must be 1 or 2, got {layout!r}")
        if layout == PACKED_LAYOUT_VERSION and not can_pack(self.in_features):
            raise ValueError(f"layout 2 needs in_features % 16 == 0, got {self.in_features}")
        q_shape = (
            packed_shape(self.out_features, self.in_features)
            if layout == PACKED_LAYOUT_VERSION
            else (self.out_features, self.in_features)
        )
        self.register_buffer("qweight", torch.zeros(q_shape, dtype=torch.int8, device=device))
        scales = torch.ones(scale_shape, dtype=dtype, device=device)
        if layout == PACKED_LAYOUT_VERSION and groups is not None:
            scales = scales.t().contiguous().t()  # group-major storage (lrkernels.quant.pack)
        self.register_buffer("scales", scales)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the scales)."""
        return self.scales.dtype

    @property
    def layout(self) -> int:
        """1 (plain qweight) or 2 (packed, `lrkernels.quant`)."""
        return layout_of(self.qweight)

    @torch.no_grad()
    def pack(self) -> Int8Linear:
        """Converts the buffers to layout 2 in place (no-op if packed); returns self."""
        if self.layout == LAYOUT_VERSION:
            if not can_pack(self.in_features):
                raise ValueError(f"layout 2 needs in_features % 16 == 0, got {self.in_features}")
            self.qweight, self.scales = pack(self.qweight, self.scales)
        return self

    @torch.no_grad()
    def unpack(self) -> Int8Linear:
        """Converts the buffers to layout 1 in place (no-op if plain); returns self."""
        if self.layout == PACKED_LAYOUT_VERSION:
            self.qweight, self.scales = unpack(self.qweight, self.scales)
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to("cuda") / .cuda(): the CUDA kernels read the packed layout, so pack once here.
        # Back to the CPU (.cpu() after training on a GPU): the C++ cpu kernels read layout 1 and
        # would unpack a packed weight on every call, so unpack once.
        came_from_cpu = self.qweight.device.type == "cpu"
        super()._apply(fn, *args, **kwargs)
        if self.qweight.is_cuda and self.layout == LAYOUT_VERSION and can_pack(self.in_features):
            self.pack()
        elif not came_from_cpu and self.qweight.device.type == "cpu":
            self.unpack()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Always the portable layout 1 (lrkernels.quant), whatever the module runs on.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == PACKED_LAYOUT_VERSION:
            q, s = unpack(self.qweight.detach(), self.scales.detach())
            destination[prefix + "qweight"] = q
            destination[prefix + "scales"] = s

    def forward(self, input: Tensor) -> Tensor:
        return self._linear_with(input, self.bias)

    # --- what `DenseWeightMixin` (the ``weight`` property) needs
    def _linear_with(self, input: Tensor, bias: Tensor | None) -> Tensor:
        from ..ops.int8 import int8_linear

        return int8_linear(
            input,
            self.qweight,
            self.scales,
            bias,
            group_size=self.group_size or None,
            backend=self.backend,
        )

    def _dense_weight(self) -> Tensor:
        return dequantize(self.qweight, self.scales)

    def _weight_meta(self) -> tuple[torch.dtype, torch.device, bool]:
        return self.scales.dtype, self.qweight.device, False

    def _weight_source(self) -> str:
        return "int8 qweight and scales"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Either layout loads; it is converted to this module's layout first.
        qkey, skey = prefix + "qweight", prefix + "scales"
        q, s = state_dict.get(qkey), state_dict.get(skey)
        if isinstance(q, Tensor) and isinstance(s, Tensor) and q.dtype == torch.int8:
            try:
                incoming = layout_of(q)
                group_size_of(q, s)
            except (TypeError, ValueError):
                incoming = None  # let the default loader report the mismatch
            if incoming is not None and incoming != self.layout:
                with torch.no_grad():
                    q, s = pack(q, s) if self.layout == PACKED_LAYOUT_VERSION else unpack(q, s)
                state_dict = dict(state_dict)
                state_dict[qkey], state_dict[skey] = q, s
        # Adopt the checkpoint's activation dtype (that of its scales) instead of letting the
        # copy round float32 scales to bfloat16: the bias follows, since the kernels take one
        # dtype for x, scales and bias. The bias keeps its Parameter object (optimizers stay
        # valid); only its data changes dtype.
        scales = state_dict.get(prefix + "scales")
        if isinstance(scales, Tensor) and scales.dtype != self.scales.dtype:
            if scales.dtype not in SCALE_DTYPES:
                error_msgs.append(
                    f"{prefix}scales: dtype {scales.dtype} is not an activation dtype of "
                    "Int8Linear (float16, bfloat16 or float32)"
                )
                return
            self.scales = self.scales.to(scales.dtype)
            if self.bias is not None:
                self.bias.data = self.bias.data.to(scales.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size == 0 else str(self.group_size)
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={group}, dtype={self.dtype}"
        )
        if self.layout != LAYOUT_VERSION:
            s += f", layout={self.layout}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    @property
    def memory_bytes(self) -> int:
        """Bytes of qweight + scales + bias."""
        return _tensor_bytes(self.qweight) + _tensor_bytes(self.scales) + _tensor_bytes(self.bias)

    @torch.no_grad()
    def dequantize(self) -> nn.Linear:
        """A new ``nn.Linear`` with ``weight = dequantize(qweight, scales)`` and a copy of the
        bias, on this module's device and dtype (with its training mode)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=self.dtype,
        ).to_empty(device=self.qweight.device)
        linear.weight.copy_(dequantize(self.qweight, self.scales))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
            linear.bias.requires_grad_(self.bias.requires_grad)
        linear.train(self.training)
        return linear

    @classmethod
    def from_quantized(
        cls,
        qweight: Tensor,
        scales: Tensor,
        bias: Tensor | None = None,
        *,
        backend: str | None = None,
        layout: int | None = None,
    ) -> Int8Linear:
        """A module holding copies of int8 ``qweight`` (out, in) or its packed form, ``scales``
        (out,) or (out, in // G) and ``bias`` (out,), on qweight's device in the scales' dtype.
        ``layout``: 1, 2, or None (the default: 2 on CUDA when in_features % 16 == 0, else 1).
        """
        group = group_size_of(qweight, scales)
        _check_dtype(scales.dtype, "scales' dtype")
        out_features, in_features = weight_shape(qweight, scales)
        if layout is None:
            on_cuda = qweight.device.type == "cuda"
            layout = PACKED_LAYOUT_VERSION if on_cuda and can_pack(in_features) else LAYOUT_VERSION
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        module = cls(
            in_features,
            out_features,
            bias=bias is not None,
            group_size=group or None,
            device=qweight.device,
            dtype=scales.dtype,
            layout=layout,
        )
        q, s = (pack if layout == PACKED_LAYOUT_VERSION else unpack)(qweight, scales)
        with torch.no_grad():
            module.qweight.copy_(q)
            module.scales.copy_(s)
            if bias is not None:
                module.bias.copy_(bias)
        module.backend = backend
        return module

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        calibration: Tensor | None = None,
        gram: Tensor | None = None,
        clip_search: bool = False,
        backend: str | None = None,
        layout: int | None = None,
    ) -> Int8Linear:
        """Quantize a dense ``nn.Linear`` (`lrkernels.quant.quantize`).

        Args:
            linear: the layer (not modified).
            group_size: None (per channel) or 32 / 64 / 128.
            dtype: activation dtype of the result (scales and bias); default the linear's
                dtype (float32 for a float64 linear).
            calibration / gram: inputs ``(..., in)`` or their Gram matrix ``XᵀX`` — used by
                ``clip_search=True`` (exactly one then); giving them without clip_search is
                an error rather than silently ignored.
            clip_search: choose a per-channel clip ratio minimising the output error on the
                calibration inputs (`lrkernels.quant.search_clip_ratio`).
            backend: stored on the module.
            layout: 1, 2 or None (2 on CUDA when in_features % 16 == 0, else 1; see
                `from_quantized`).

        The result is on the linear's device, with a copy of its bias, the bias's
        ``requires_grad`` flag and the linear's training mode.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        if dtype is None:
            dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float32
        dtype = _check_dtype(dtype)
        has_data = calibration is not None or gram is not None
        if clip_search and not has_data:
            raise ValueError("clip_search=True needs calibration inputs or their gram")
        if has_data and not clip_search:
            raise ValueError(
                "calibration/gram are only used by the clip search: pass clip_search=True"
            )
        clip_ratio: float | Tensor = 1.0
        if clip_search:
            clip_ratio = search_clip_ratio(
                weight, calibration, gram=gram, group_size=group_size, scale_dtype=dtype
            )
        qweight, scales = quantize(weight, group_size, scale_dtype=dtype, clip_ratio=clip_ratio)
        return cls._from_linear_quantized(linear, qweight, scales, backend, layout)

    @classmethod
    def _from_linear_quantized(
        cls,
        linear: nn.Linear,
        qweight: Tensor,
        scales: Tensor,
        backend: str | None,
        layout: int | None = None,
    ) -> Int8Linear:
        bias = None if linear.bias is None else linear.bias.detach().to(scales.dtype)
        module = cls.from_quantized(qweight, scales, bias, backend=backend, layout=layout)
        if linear.bias is not None:
            module.bias.requires_grad_(linear.bias.requires_grad)
        module.train(linear.training)
        return module


# --------------------------------------------------------------------------------------------
# Model-level conversion
# --------------------------------------------------------------------------------------------


@dataclass
class Int8LayerReport:
    """One selected ``nn.Linear``.

    ``bytes_*`` count the layer's weight and bias (plus scales after quantization);
    ``bytes_after == bytes_before`` for a skipped layer. ``relative_error`` is the relative
    output error ``‖(W − Ŵ)·Xᵀ‖_F / ‖W·Xᵀ‖_F`` on the calibration inputs (None without
    calibration); ``clip_ratio`` the mean per-channel clip ratio (1.0 without clip search).
    ``skipped`` gives the reason a layer was left dense.
    """

    name: str
    in_features: int
    out_features: int
    group_size: int
    bytes_before: int
    bytes_after: int
    relative_error: float | None = None
    clip_ratio: float = 1.0
    skipped: str | None = None

    @property
    def quantized(self) -> bool:
        return self.skipped is None


@dataclass
class QuantizeReport:
    """What `quantize_linears` did: one `Int8LayerReport` per selected layer (in module
    order), and the whole model's bytes (all unique parameters and buffers) before and after."""

    layers: list[Int8LayerReport] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    calibrated: bool = False
    clip_search: bool = False

    @property
    def quantized(self) -> list[Int8LayerReport]:
        return [layer for layer in self.layers if layer.quantized]

    @property
    def skipped(self) -> list[Int8LayerReport]:
        return [layer for layer in self.layers if not layer.quantized]

    @property
    def compression(self) -> float:
        """``bytes_after / bytes_before`` for the whole model."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def __str__(self) -> str:
        header = ["layer", "in", "out", "group", "bytes before", "bytes after", "rel. err", ""]
        rows = [header]
        for layer in self.layers:
            err = "-" if layer.relative_error is None else f"{layer.relative_error:.3e}"
            note = "" if layer.skipped is None else f"skipped: {layer.skipped}"
            if layer.skipped is None and layer.clip_ratio != 1.0:
                note = f"clip {layer.clip_ratio:.3f}"
            rows.append(
                [
                    layer.name,
                    str(layer.in_features),
                    str(layer.out_features),
                    "channel" if layer.group_size == 0 else str(layer.group_size),
                    f"{layer.bytes_before:,}",
                    f"{layer.bytes_after:,}",
                    err,
                    note,
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = []
        for row in rows:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:], strict=True)]
            lines.append("  ".join(cells + [row[-1]]).rstrip())
        lines.insert(1, "-" * len(lines[0]))
        extra = ", calibrated" if self.calibrated else ""
        extra += ", clip search" if self.clip_search else ""
        lines.append(
            f"model: {self.bytes_before:,} -> {self.bytes_after:,} bytes "
            f"({self.compression:.1%}); {len(self.quantized)} of {len(self.layers)} "
            f"selected layers quantized to int8{extra}"
        )
        return "\n".join(lines)


def _model_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t)
    return total


def quantize_linears(
    model: nn.Module,
    *,
    group_size: int | None = None,
    include: NameFilter = None,
    exclude: NameFilter = None,
    dtype: torch.dtype | None = None,
    calibration_batches: Iterable[Any] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    clip_search: bool = False,
    backend: str | None = None,
) -> QuantizeReport:
    """Replace the selected ``nn.Linear`` submodules of ``model`` (in place) by `Int8Linear`.

    Selection: every ``nn.Linear`` (subclasses included) whose qualified name (as in
    ``model.named_modules()``) passes ``include`` (if given) and not ``exclude`` (if given);
    each is a callable ``name -> bool`` or a regular expression matched with ``re.search``.
    Selected layers are left dense, and reported as skipped, when:

    - in_features is not divisible by ``group_size``;
    - its weight is shared with another module (tied weights, e.g. an LM head tied to the
      embedding: a quantized copy would add bytes, not save them, and break the tie);
    - its parameters are uninitialised (lazy modules);
    - ``dtype`` is None and the layer is float64 (no int8 kernel computes in float64; pass
      ``dtype`` to choose the activation dtype explicitly).

    ``dtype``: activation dtype of the quantized layers (default: each layer's own dtype).
    The model's activations must then be in that dtype.

    Calibration: with ``calibration_batches`` (an iterable of batches), forward pre-hooks
    accumulate each selected layer's input Gram matrix ``XᵀX`` in float64
    (`lrkernels.factorize.GramAccumulator`) while ``forward_fn(model, batch)`` (default
    ``model(batch)``) runs for every batch under ``torch.no_grad()``; the hooks are removed
    afterwards, also if a forward raises (and then no layer is replaced). The report then
    gives every layer's relative output error, and ``clip_search=True`` (which needs
    calibration) picks per-channel clip ratios minimising it
    (`lrkernels.quant.search_clip_ratio`). A layer that saw no calibration inputs is
    quantized without clipping (with a warning).

    A module registered under several names is replaced everywhere by one `Int8Linear`
    (reported under its first name). The ``out_proj`` of an ``nn.MultiheadAttention`` is
    replaced too (MHA reads ``out_proj.weight``, which `Int8Linear.weight` provides; it is
    computed dense there), but MHA never calls it, so it sees no calibration inputs (quantized
    without clip search, with a warning). A filter that selects no layer warns. A calibration
    error (e.g. a batch of the wrong width) is re-raised naming the batch and the layer.

    Returns:
        `QuantizeReport` with a row per selected layer and the model's byte totals.
    """
    group = normalize_group_size(group_size)
    if dtype is not None:
        dtype = _check_dtype(dtype)
    if clip_search and calibration_batches is None:
        raise ValueError("clip_search=True needs calibration_batches")
    include_fn = name_predicate(include, "include")
    exclude_fn = name_predicate(exclude, "exclude")
    if forward_fn is None:

        def forward_fn(m: nn.Module, batch: Any) -> Any:
            return m(batch)

    index = index_linears(model)
    refs, first_name, linears = index.refs, index.first_name, index.linears
    owners = index.owners

    report = QuantizeReport(
        bytes_before=_model_bytes(model),
        calibrated=calibration_batches is not None,
        clip_search=clip_search,
    )
    if isinstance(model, nn.Linear):
        warnings.warn("quantize_linears: the root module itself is not replaced", stacklevel=2)
    todo: list[tuple[nn.Linear, Int8LayerReport, torch.dtype]] = []
    for key, layer in linears.items():
        name = first_name[key]
        if include_fn is not None and not include_fn(name):
            continue
        if exclude_fn is not None and exclude_fn(name):
            continue
        lazy = any(
            isinstance(p, nn.parameter.UninitializedParameter)
            for p in (layer.weight, layer.bias)
            if p is not None
        )
        in_f, out_f = (0, 0) if lazy else (layer.in_features, layer.out_features)
        before = 0 if lazy else _tensor_bytes(layer.weight) + _tensor_bytes(layer.bias)
        row = Int8LayerReport(name, in_f, out_f, group, before, before)
        report.layers.append(row)
        if lazy:
            row.skipped = "uninitialised (lazy) parameters"
        elif owners.get(id(layer.weight), 0) > 1:
            row.skipped = "weight is shared with another module (tied)"
        elif min(in_f, out_f) < 1:
            row.skipped = "empty weight"
        elif group and in_f % group != 0:
            row.skipped = f"in_features {in_f} is not divisible by group_size {group}"
        elif dtype is None and layer.weight.dtype not in SCALE_DTYPES:
            row.skipped = f"{layer.weight.dtype} layer (pass dtype= to quantize it)"
        else:
            todo.append((layer, row, dtype or layer.weight.dtype))

    warn_if_nothing_selected("quantize_linears", index, include, exclude, len(report.layers))
    grams: dict[int, GramAccumulator] = {}
    if calibration_batches is not None and todo:
        layers = [(layer, row.name) for layer, row, _ in todo]
        grams = calibrate("quantize_linears", model, layers, calibration_batches, forward_fn)

    for layer, row, layer_dtype in todo:
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
                    f"quantize_linears: layer {row.name!r} saw no calibration inputs{why}; "
                    "quantizing without clip search",
                    stacklevel=2,
                )
            else:
                gram = acc.gram
        ratios = None
        if clip_search and gram is not None:
            ratios = search_clip_ratio(
                layer.weight, gram=gram, group_size=group or None, scale_dtype=layer_dtype
            )
            row.clip_ratio = float(ratios.mean())
        qweight, scales = quantize(
            layer.weight,
            group or None,
            scale_dtype=layer_dtype,
            clip_ratio=1.0 if ratios is None else ratios,
        )
        new = Int8Linear._from_linear_quantized(layer, qweight, scales, backend)
        if gram is not None:
            row.relative_error = quantization_error(layer.weight, qweight, scales, gram)
        row.bytes_after = new.memory_bytes
        for parent, attr in refs[id(layer)]:
            setattr(parent, attr, new)

    report.bytes_after = _model_bytes(model)
    return report

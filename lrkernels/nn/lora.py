"""LoRA adapters on frozen dense or int8 layers (re-exported by `lrkernels.nn`).

- `LoRALinear`: ``y = base(x) + s · (drop(x) · Aᵀ) · Bᵀ`` over an ``nn.Linear`` or an
  `Int8Linear`, computed by `lrkernels.lora_linear` in one fused pass; ``s = alpha / r``
  (``alpha / √r`` with rsLoRA). The base is frozen; A and B train. `merge` / `unmerge`.
- `add_lora`: wrap the selected layers of a model in place; returns a `LoRAReport`.
- `lora_state_dict` / `save_lora` / `load_lora`: the adapters only (safetensors).
- `save_peft_adapter` / `load_peft_adapter`: PEFT's adapter directory format
  (``adapter_config.json`` + ``adapter_model.safetensors``, keys
  ``base_model.model.<name>.lora_A.weight``): adapters trained with PEFT load here with
  identical outputs, and adapters saved here load in PEFT.
- `MultiLoRALinear`: many adapters stacked on one base for serving, each row of a batch with its
  own adapter (`lrkernels.lora_linear_multi`).

Initialisation follows PEFT: A Kaiming-uniform (a = √5), B zero, so a fresh adapter leaves the
layer's output unchanged. Dropout applies to the LoRA branch's input in training mode only.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..quant import PACKED_LAYOUT_VERSION, layout_of, pack, quantize, unpack
from ._walk import NameFilter, index_linears, name_predicate
from ._weight import DenseWeightMixin
from .int8 import Int8Linear

__all__ = [
    "LoRALayerReport",
    "LoRALinear",
    "LoRAReport",
    "MultiLoRALinear",
    "add_lora",
    "load_lora",
    "load_lora_state_dict",
    "load_peft_adapter",
    "lora_layers",
    "lora_scale",
    "lora_state_dict",
    "save_lora",
    "save_peft_adapter",
]

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / √r`` for rank-stabilised LoRA (rsLoRA)."""
    return float(alpha) / (math.sqrt(r) if rslora else r)


class LoRALinear(DenseWeightMixin, nn.Module):
    """A frozen ``nn.Linear`` or `Int8Linear` plus a trainable low-rank adapter:
    ``y = base(x) + s · (drop(x) · Aᵀ) · Bᵀ`` with A ``(r, in)``, B ``(out, r)``.

    Args:
        base: the layer to adapt (kept as ``self.base``; its parameters are frozen).
        r: adapter rank (>= 1).
        alpha: scaling numerator: ``s = alpha / r`` (``alpha / √r`` with ``rslora=True``).
        dropout: dropout probability of the LoRA branch's input in training mode, regenerated
            from a seed in the backward (never stored); rounded to a multiple of 1/65536.
        rslora: rank-stabilised scaling.
        backend: passed to `lrkernels.lora_linear` (None = automatic).

    Parameters ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` live in the base's activation
    dtype and device. The full ``state_dict`` holds ``base.*`` and both adapter matrices;
    `lora_state_dict` / `save_peft_adapter` give the adapters alone.

    Like the other converted layers it is a drop-in where code reads ``nn.Linear`` attributes:
    ``bias`` is the base's, ``weight`` the read-only effective weight ``W + s·B·A``
    (`lrkernels.nn._weight`: ``F.linear(x, layer.weight, b)`` runs `lora_linear`; other uses
    see the dense sum, differentiable in A and B), so e.g. ``nn.TransformerEncoderLayer``
    keeps working with adapted ``linear1`` / ``linear2``.
    """

    def __init__(
        self,
        base: nn.Linear | Int8Linear,
        r: int,
        alpha: float = 1.0,
        dropout: float = 0.0,
        rslora: bool = False,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear | Int8Linear):
            raise TypeError(
                f"base must be an nn.Linear or an Int8Linear, got {type(base).__name__}"
            )
        if isinstance(base, LoRALinear):  # pragma: no cover - LoRALinear is neither
            raise TypeError("base is already a LoRALinear")
        self.r = _positive_int(r, "r")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.rslora = bool(rslora)
        self.backend = backend
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        weight = self._dense_or_qweight()
        dtype = base.dtype if isinstance(base, Int8Linear) else weight.dtype
        self.lora_A = nn.Parameter(
            torch.empty(self.r, self.in_features, dtype=dtype, device=weight.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, self.r, dtype=dtype, device=weight.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self._unmerged_int8: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ properties

    def _dense_or_qweight(self) -> Tensor:
        return self.base.qweight if isinstance(self.base, Int8Linear) else self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.rslora)

    def base_spec(self):
        """The base as `lrkernels.lora_linear` takes it: a Tensor or (qweight, scales)."""
        if isinstance(self.base, Int8Linear):
            return (self.base.qweight, self.base.scales)
        return self.base.weight

    def extra_repr(self) -> str:
        s = f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}"
        if self.dropout:
            s += f", dropout={self.dropout:g}"
        if self.rslora:
            s += ", rslora=True"
        if self.merged:
            s += ", merged=True"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    # ------------------------------------------------------------------ forward

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias (frozen with it)."""
        return self.base.bias

    def forward(self, input: Tensor) -> Tensor:
        return self._linear_with(input, self.base.bias)

    # --- what `DenseWeightMixin` (the ``weight`` property) needs
    def _linear_with(self, input: Tensor, bias: Tensor | None) -> Tensor:
        if self.merged:
            if isinstance(self.base, Int8Linear):
                return self.base._linear_with(input, bias)
            return nn.functional.linear(input, self.base.weight, bias)
        from ..ops.lora import lora_linear

        return lora_linear(
            input,
            self.base_spec(),
            self.lora_A,
            self.lora_B,
            bias,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
        )

    def _dense_weight(self) -> Tensor:
        base = self.base
        w = base._dense_weight() if isinstance(base, Int8Linear) else base.weight
        if self.merged:
            return w
        return w + (self.scale * (self.lora_B @ self.lora_A)).to(w.dtype)

    def _weight_meta(self) -> tuple[torch.dtype, torch.device, bool]:
        trains = not self.merged and (self.lora_A.requires_grad or self.lora_B.requires_grad)
        return self.lora_A.dtype, self.lora_A.device, trains

    def _weight_source(self) -> str:
        return "base weight and adapter (lora_A, lora_B)"

    # ------------------------------------------------------------------ merge

    def delta_weight(self) -> Tensor:
        """``s · B · A`` (out, in) in float32 (float64 for float64 adapters)."""
        acc = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        return (self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc)) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base: afterwards the forward is the base layer alone.

        Dense base: ``W += s · B · A`` (computed in float32, rounded once to W's dtype).
        int8 base: merging means **re-quantizing** ``dequant(q, s) + s · B · A`` with the same
        group size (the merged layer carries int8 rounding error on top of the adapter), stored
        in the base's layout (plain or packed); the original qweight and scales are kept so that
        `unmerge` restores them exactly.
        """
        if self.merged:
            warnings.warn("LoRALinear.merge: already merged", stacklevel=2)
            return
        delta = self.delta_weight()
        if isinstance(self.base, Int8Linear):
            from ..quant import dequantize

            base = self.base
            self._unmerged_int8 = (base.qweight.clone(), base.scales.clone())
            w = dequantize(base.qweight, base.scales, dtype=delta.dtype) + delta
            q, s = quantize(w, base.group_size or None, scale_dtype=base.scales.dtype)
            if base.layout == PACKED_LAYOUT_VERSION:
                q, s = pack(q, s)
            base.qweight.copy_(q)
            base.scales.copy_(s)
        else:
            w = self.base.weight
            w.copy_((w.to(delta.dtype) + delta).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`. int8 base: the original qweight and scales come back exactly. Dense
        base: ``W −= s · B · A`` (as PEFT does; exact up to one rounding of W's dtype)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge: not merged", stacklevel=2)
            return
        if isinstance(self.base, Int8Linear):
            q, s = self._unmerged_int8
            if layout_of(q) != self.base.layout:  # the base was packed / unpacked meanwhile
                q, s = (pack if self.base.layout == PACKED_LAYOUT_VERSION else unpack)(q, s)
            self.base.qweight.copy_(q)
            self.base.scales.copy_(s)
            self._unmerged_int8 = None
        else:
            delta = self.delta_weight()
            w = self.base.weight
            w.copy_((w.to(delta.dtype) - delta).to(w.dtype))
        self.merged = False

    def merged_module(self) -> nn.Module:
        """Merge and return the base layer (to replace this module for inference)."""
        if not self.merged:
            self.merge()
        return self.base


# --------------------------------------------------------------------------------------------
# Model-level: add_lora and its report
# --------------------------------------------------------------------------------------------


@dataclass
class LoRALayerReport:
    """One selected layer: its shape, the adapter's rank and parameter count, or why it was
    skipped."""

    name: str
    in_features: int
    out_features: int
    base: str  # "dense" or "int8"
    r: int
    params: int
    skipped: str | None = None


@dataclass
class LoRAReport:
    """What `add_lora` did: a row per selected layer, and the trainable parameter counts."""

    layers: list[LoRALayerReport] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    @property
    def adapted(self) -> list[LoRALayerReport]:
        return [row for row in self.layers if row.skipped is None]

    def __str__(self) -> str:
        lines = [f"{'layer':<40} {'in':>6} {'out':>6} {'base':>5} {'r':>4} {'params':>10}"]
        for row in self.layers:
            note = f"  skipped: {row.skipped}" if row.skipped else ""
            lines.append(
                f"{row.name:<40} {row.in_features:>6} {row.out_features:>6} {row.base:>5} "
                f"{row.r:>4} {row.params:>10,}{note}"
            )
        frac = self.trainable_params / self.total_params if self.total_params else 0.0
        lines.append(
            f"{len(self.adapted)} of {len(self.layers)} selected layers adapted; trainable "
            f"{self.trainable_params:,} of {self.total_params:,} parameters ({frac:.3%})"
        )
        return "\n".join(lines)


def _targets(model: nn.Module) -> tuple[dict[str, nn.Module], dict[int, list], set[int], set[int]]:
    """name -> layer for every nn.Linear (via the shared walk) and Int8Linear of the model
    (first name of each), every (parent, attr) reference, the MHA-owned layer ids and the ids
    of layers whose weight another module shares (tied embeddings)."""
    index = index_linears(model)
    names = {index.first_name[k]: m for k, m in index.linears.items()}
    refs = dict(index.refs)
    seen = set(index.first_name)
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if not isinstance(child, Int8Linear):
                continue
            refs.setdefault(id(child), [])
            if (parent, attr) not in refs[id(child)]:
                refs[id(child)].append((parent, attr))
            if id(child) not in seen:
                seen.add(id(child))
                names[f"{parent_name}.{attr}" if parent_name else attr] = child
    tied = {
        key for key, layer in index.linears.items() if index.owners.get(id(layer.weight), 0) > 1
    }
    return names, refs, index.mha_owned, tied


def _count(model: nn.Module) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def add_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    target: NameFilter = None,
    dropout: float = 0.0,
    rslora: bool = False,
    freeze_model: bool = True,
    backend: str | None = None,
    rank_for: Callable[[str], int] | None = None,
) -> LoRAReport:
    """Wrap the selected ``nn.Linear`` / `Int8Linear` layers of ``model`` (in place) in
    `LoRALinear` adapters.

    Args:
        target: which layers (by qualified name): a regex matched with ``re.search``, a
            callable ``name -> bool``, or None for every linear layer.
        r, alpha, dropout, rslora, backend: as for `LoRALinear`.
        freeze_model: set ``requires_grad=False`` on every parameter of the model first, so that
            only the adapters train (PEFT's default).
        rank_for: optional per-layer rank ``name -> r`` (PEFT's rank_pattern).

    Skipped and reported: a layer owned by an ``nn.MultiheadAttention`` (which reads
    ``out_proj.weight`` directly), and a layer whose weight another module shares (a head tied
    to the embedding: `LoRALinear.merge` writes the base weight, which would change the
    embedding too), as the other converters skip it. Warns when the target selects nothing.
    """
    select = name_predicate(target, "target")
    names, refs, mha_owned, tied = _targets(model)
    report = LoRAReport()
    if freeze_model:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, layer in names.items():
        if select is not None and not select(name):
            continue
        rank = _positive_int(rank_for(name) if rank_for is not None else r, f"rank of {name}")
        kind = "int8" if isinstance(layer, Int8Linear) else "dense"
        row = LoRALayerReport(name, layer.in_features, layer.out_features, kind, rank, 0)
        report.layers.append(row)
        if id(layer) in mha_owned:
            row.skipped = "owned by nn.MultiheadAttention (uses .weight directly)"
            continue
        if id(layer) in tied:
            row.skipped = "weight tied to another module (merging would change both)"
            continue
        new = LoRALinear(layer, rank, alpha, dropout, rslora, backend=backend)
        row.params = new.lora_A.numel() + new.lora_B.numel()
        for parent, attr in refs[id(layer)]:
            setattr(parent, attr, new)
    if not report.layers:
        warnings.warn(f"add_lora: target {target!r} selects no linear layer", stacklevel=2)
    report.trainable_params, report.total_params = _count(model)
    return report


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> every `LoRALinear` of the model (first name of each)."""
    out: dict[str, LoRALinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[name] = module
    return out


# --------------------------------------------------------------------------------------------
# Adapter-only state: our format and PEFT's
# --------------------------------------------------------------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters only: ``{"<name>.lora_A": (r, in), "<name>.lora_B": (out, r)}``."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


def _load_pairs(model: nn.Module, pairs: dict[str, tuple[Tensor, Tensor]], what: str) -> None:
    layers = lora_layers(model)
    missing = sorted(set(layers) - set(pairs))
    unexpected = sorted(set(pairs) - set(layers))
    if missing or unexpected:
        raise ValueError(
            f"{what}: adapters do not match the model's LoRA layers (missing: {missing}, "
            f"unexpected: {unexpected})"
        )
    for name, (a, b) in pairs.items():
        layer = layers[name]
        if tuple(a.shape) != tuple(layer.lora_A.shape) or tuple(b.shape) != tuple(
            layer.lora_B.shape
        ):
            raise ValueError(
                f"{what}: {name}: expected lora_A {tuple(layer.lora_A.shape)} and lora_B "
                f"{tuple(layer.lora_B.shape)}, got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if layer.merged:
            raise RuntimeError(f"{what}: {name} is merged; unmerge it before loading adapters")
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load `lora_state_dict` output into a model that already has the same LoRA layers."""
    pairs: dict[str, list] = {}
    for key, value in state.items():
        name, _, which = key.rpartition(".")
        if which not in ("lora_A", "lora_B"):
            raise ValueError(f"load_lora_state_dict: unexpected key {key!r}")
        pairs.setdefault(name, [None, None])[which == "lora_B"] = value
    for name, pair in pairs.items():
        if pair[0] is None or pair[1] is None:
            raise ValueError(f"load_lora_state_dict: {name} lacks lora_A or lora_B")
    _load_pairs(model, {k: (a, b) for k, (a, b) in pairs.items()}, "load_lora_state_dict")


def save_lora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `lora_state_dict` to a safetensors file (with r / alpha per layer as metadata)."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    meta = {
        name: json.dumps({"r": m.r, "alpha": m.alpha, "rslora": m.rslora, "dropout": m.dropout})
        for name, m in layers.items()
    }
    state = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    save_file(state, os.fspath(path), metadata=meta)


def load_lora(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a file written by `save_lora` into a model with the same LoRA layers."""
    from safetensors.torch import load_file

    load_lora_state_dict(model, load_file(os.fspath(path)))


def _peft_config(layers: dict[str, LoRALinear]) -> dict:
    first = next(iter(layers.values()))
    r, alpha = first.r, first.alpha
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout,
        "use_rslora": first.rslora,
        "target_modules": sorted(layers),
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.alpha for n, m in layers.items() if m.alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "lora_bias": False,
    }


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the model's adapters as a PEFT adapter directory: ``adapter_config.json`` and
    ``adapter_model.safetensors`` with keys ``base_model.model.<name>.lora_A.weight`` (the
    names of the layers in ``model``). ``peft.PeftModel.from_pretrained(model_without_lora,
    directory)`` then reproduces this model's outputs. All layers must share dropout and
    rsLoRA (PEFT's config has one of each); ranks and alphas may differ per layer."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_peft_adapter: the model has no LoRALinear layer")
    if len({(m.dropout, m.rslora) for m in layers.values()}) > 1:
        raise ValueError("save_peft_adapter: PEFT needs one dropout and one rslora for all layers")
    os.makedirs(directory, exist_ok=True)
    state = {}
    for name, layer in layers.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    save_file(state, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(_peft_config(layers), f, indent=2, sort_keys=True)


def _peft_target_predicate(targets) -> Callable[[str], bool]:
    """PEFT's matching: a string is a full regex match; a list matches a name equal to an
    entry or ending with ``.entry``."""
    if isinstance(targets, str):
        if targets == "all-linear":
            raise ValueError("load_peft_adapter: target_modules='all-linear' is not supported")
        pattern = re.compile(targets)
        return lambda name: pattern.fullmatch(name) is not None
    entries = list(targets or [])
    return lambda name: any(name == t or name.endswith("." + t) for t in entries)


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


_UNSUPPORTED_PEFT = {
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "modules_to_save": None,
    "layer_replication": None,
}


def load_peft_adapter(
    model: nn.Module, directory: str | os.PathLike, *, backend: str | None = None
) -> LoRAReport:
    """Add the LoRA layers a PEFT adapter directory describes to ``model`` (in place, the
    base layers frozen) and load their weights. ``model`` is the plain base model PEFT was
    applied to (its module names are the keys without ``base_model.model.``); its
    ``nn.Linear`` layers may have been converted to `Int8Linear` first. Honours r,
    lora_alpha, use_rslora, lora_dropout, target_modules, rank_pattern and alpha_pattern;
    raises on PEFT features this library does not implement (DoRA, LoRA bias, fan_in_fan_out,
    layers_to_transform, modules_to_save). Returns the `add_lora` report."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_peft_adapter: not a LoRA adapter (peft_type {config['peft_type']})")
    for key, default in _UNSUPPORTED_PEFT.items():
        if config.get(key, default) not in (default, [], {}):
            raise ValueError(f"load_peft_adapter: {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"load_peft_adapter: bias={config['bias']!r} is not supported")
    state = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    pairs: dict[str, list] = {}
    for key, value in state.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"load_peft_adapter: unexpected key {key!r}")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key[len(PEFT_PREFIX) :])
        if m is None:
            raise ValueError(f"load_peft_adapter: unexpected key {key!r}")
        pairs.setdefault(m.group(1), [None, None])[m.group(2) == "B"] = value

    r, alpha = int(config["r"]), float(config["lora_alpha"])
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    targeted = _peft_target_predicate(config.get("target_modules"))
    selected = set(pairs)

    def target(name: str) -> bool:
        return name in selected and targeted(name)

    def rank_for(name: str) -> int:
        return int(_pattern_value(rank_pattern, name, r))

    report = add_lora(
        model,
        r=r,
        alpha=alpha,
        target=target,
        dropout=float(config.get("lora_dropout", 0.0)),
        rslora=bool(config.get("use_rslora", False)),
        backend=backend,
        rank_for=rank_for,
    )
    layers = lora_layers(model)
    for name, layer in layers.items():
        a = _pattern_value(alpha_pattern, name, None)
        if a is not None:
            layer.alpha = float(a)
    missing = sorted(selected - set(layers))
    if missing:
        raise ValueError(f"load_peft_adapter: the model has no linear layer named {missing}")
    _load_pairs(
        model,
        {
            name: (a.to(layers[name].lora_A.dtype), b.to(layers[name].lora_B.dtype))
            for name, (a, b) in pairs.items()
        },
        "load_peft_adapter",
    )
    return report


# --------------------------------------------------------------------------------------------
# Serving: many adapters on one base
# --------------------------------------------------------------------------------------------


class MultiLoRALinear(nn.Module):
    """One frozen base and ``n_adapters`` stacked adapters of rank at most ``r_max``;
    ``forward(x, adapter_index)`` runs each row of x with its own adapter (−1: base only) in
    one `lrkernels.lora_linear_multi` call — no host sync, fixed shapes, CUDA-graph friendly.

    Buffers: ``lora_A`` (n, r_max, in), ``lora_B`` (n, out, r_max) in the base's dtype,
    ``ranks`` int32 (n,), ``scales`` float32 (n,); an empty slot has rank 0.
    """

    def __init__(
        self, base: nn.Linear | Int8Linear, n_adapters: int, r_max: int, *, backend=None
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear | Int8Linear):
            raise TypeError(
                f"base must be an nn.Linear or an Int8Linear, got {type(base).__name__}"
            )
        n = _positive_int(n_adapters, "n_adapters")
        self.r_max = _positive_int(r_max, "r_max")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.qweight if isinstance(base, Int8Linear) else base.weight
        dtype = base.dtype if isinstance(base, Int8Linear) else w.dtype
        kw = {"device": w.device}
        self.register_buffer(
            "lora_A", torch.zeros(n, self.r_max, base.in_features, dtype=dtype, **kw)
        )
        self.register_buffer(
            "lora_B", torch.zeros(n, base.out_features, self.r_max, dtype=dtype, **kw)
        )
        self.register_buffer("ranks", torch.zeros(n, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(n, dtype=torch.float32, **kw))
        self.backend = backend

    @property
    def n_adapters(self) -> int:
        return self.lora_A.shape[0]

    @torch.no_grad()
    def set_adapter(self, slot: int, A: Tensor, B: Tensor, scale: float) -> None:
        """Put adapter (A (r, in), B (out, r), scale) in ``slot``; columns past r are zeroed."""
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r or r > self.r_max:
            raise ValueError(
                f"set_adapter: need A (r, {self.base.in_features}) and B "
                f"({self.base.out_features}, r) with r <= {self.r_max}, got {tuple(A.shape)} "
                f"and {tuple(B.shape)}"
            )
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r].copy_(A)
        self.lora_B[slot, :, :r].copy_(B)
        self.ranks[slot] = r
        self.scales[slot] = float(scale)

    def load_from(self, slot: int, layer: LoRALinear) -> None:
        """Copy a trained `LoRALinear`'s adapter into ``slot``."""
        self.set_adapter(slot, layer.lora_A, layer.lora_B, layer.scale)

    def forward(self, input: Tensor, adapter_index: Tensor) -> Tensor:
        from ..ops.lora import lora_linear_multi

        base = (
            (self.base.qweight, self.base.scales)
            if isinstance(self.base, Int8Linear)
            else self.base.weight
        )
        return lora_linear_multi(
            input,
            base,
            self.lora_A,
            self.lora_B,
            adapter_index,
            ranks=self.ranks,
            scales=self.scales,
            bias=self.base.bias,
            backend=self.backend,
        )

"""Compressed checkpoints: save a converted model with its plan, load it into a fresh dense one.

A compressed model's state_dict alone cannot be loaded into a freshly built model: the fresh
model has ``nn.Linear`` layers where the saved one has `LowRankLinear` (with ranks that may
depend on the data, e.g. ``energy=0.9``) or `Int8Linear` (with a group size and a scale
dtype), and some layers were skipped. So the file also carries the **plan**: which layers were
converted, to what, with which sizes. Loading applies the plan to the fresh model — building
empty modules of the right shapes, no calibration data, no SVD — then loads the tensors::

    lrkernels.nn.save_compressed(model, "model.safetensors")        # after factorize/quantize
    model = build_model()                                            # fresh, dense
    lrkernels.nn.load_compressed(model, "model.safetensors")         # one call

On disk: one safetensors file (`safetensors.torch.save_model`: tied tensors stored once,
tensors contiguous), the plan as JSON in its string metadata under ``"lrkernels.plan"``.

The plan (version 1)
--------------------
A small JSON-able dict, versioned, extensible by layer kind::

    {"format": "lrkernels.plan", "version": 1,
     "layers": {
        "encoder.layers.0.linear1": {"kind": "lowrank", "in_features": 512,
                                     "out_features": 2048, "rank": 64, "bias": true},
        "encoder.layers.0.linear2": {"kind": "int8", "in_features": 2048, "out_features": 512,
                                     "group_size": 128, "dtype": "bfloat16", "bias": true,
                                     "layout": 1}}}

``layers`` maps a module's qualified name (its first name in ``model.named_modules()``; a
module registered under several names is converted everywhere) to an entry with a ``"kind"``
and that kind's fields. Readers reject a higher ``version``; new kinds and new optional fields
do not need a new version (a reader that meets an unknown kind says so).

Adding a kind (how LoRA plugs in)
---------------------------------
`register_plan_kind(kind, module_type, describe, build)`:

- ``describe(module) -> dict``: the JSON-able fields of an entry for a module of
  ``module_type`` (without ``"kind"``); its children are not visited (the entry covers them);
- ``build(module, entry) -> nn.Module``: the replacement for ``module`` — the fresh model's
  module at that name, normally an ``nn.Linear`` — with the entry's shapes, on ``module``'s
  device; its values are then loaded from the file, so they may be left uninitialised. A kind
  whose module wraps another (a LoRA adapter on an int8 base) can store the base as a nested
  entry (``"base": {"kind": "int8", ...}``) and build it with `build_layer`.

The ``"lora"`` kind (`LoRALinear`) is registered so: ``{"kind": "lora", "in_features": ...,
"out_features": ..., "bias": ..., "r": 16, "alpha": 32.0, "rslora": false, "dropout": 0.05,
"base": {"kind": "dense"} | {"kind": "int8", <int8 fields>}}`` — a LoRA model (its adapters
trained, on a dense or an int8 base) reloads into a fresh dense model in one call. A merged
layer is refused (unmerge it, or save `merged_module()`).

`compression_plan` / `apply_plan` are the two halves without files (e.g. to ship the plan
next to a PEFT adapter, or to build an empty compressed model on the meta device).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .int8 import Int8Linear
from .lora import LoRALinear
from .lowrank import LowRankLinear

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "apply_plan",
    "build_layer",
    "compression_plan",
    "load_compressed",
    "read_plan",
    "register_plan_kind",
    "save_compressed",
]

PLAN_FORMAT = "lrkernels.plan"
PLAN_VERSION = 1
METADATA_KEY = "lrkernels.plan"


@dataclass(frozen=True)
class PlanKind:
    """How one kind of converted layer is described in a plan and rebuilt from it."""

    kind: str
    module_type: type
    describe: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[nn.Module, dict[str, Any]], nn.Module]


_KINDS: dict[str, PlanKind] = {}


def register_plan_kind(
    kind: str,
    module_type: type,
    describe: Callable[[nn.Module], dict[str, Any]],
    build: Callable[[nn.Module, dict[str, Any]], nn.Module],
) -> None:
    """Teaches plans a layer kind (module docstring). Registering a kind again replaces it."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    _KINDS[kind] = PlanKind(kind, module_type, describe, build)


def _kind_of(module: nn.Module) -> PlanKind | None:
    for spec in _KINDS.values():  # exact types first: a subclass may be its own kind
        if type(module) is spec.module_type:
            return spec
    for spec in _KINDS.values():
        if isinstance(module, spec.module_type):
            return spec
    return None


# ----------------------------------------------------------------------------- the plan


def compression_plan(model: nn.Module) -> dict[str, Any]:
    """The plan of a converted model: every module of a registered kind (`LowRankLinear`,
    `Int8Linear`, ...), by its first qualified name. JSON-able (`json.dumps` works as is)."""
    layers: dict[str, dict[str, Any]] = {}
    covered: list[str] = []  # entries cover their modules' children
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in covered):
            continue
        spec = _kind_of(module)
        if spec is None:
            continue
        if name == "":
            raise ValueError(
                f"compression_plan: the model itself is a {type(module).__name__}; save it "
                "inside a container module"
            )
        layers[name] = {"kind": spec.kind, **spec.describe(module)}
        covered.append(name)
    return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "layers": layers}


def check_plan(plan: Any) -> dict[str, Any]:
    """Validates a plan's envelope (format, version, layers) and returns it."""
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a lrkernels compression plan (format {PLAN_FORMAT!r}): {plan!r}")
    version = plan.get("version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"compression plan: bad version {version!r}")
    if version > PLAN_VERSION:
        raise ValueError(
            f"compression plan version {version} was written by a newer lrkernels; this one "
            f"reads versions up to {PLAN_VERSION} (upgrade lrkernels)"
        )
    layers = plan.get("layers")
    if not isinstance(layers, dict):
        raise ValueError("compression plan: 'layers' must be a dict of name -> entry")
    for name, entry in layers.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
            raise ValueError(f"compression plan: layer {name!r} has no 'kind': {entry!r}")
    return plan


def build_layer(module: nn.Module, entry: dict[str, Any], name: str = "layer") -> nn.Module:
    """The module an entry describes, built in place of ``module`` (no data needed). If
    ``module`` already is that layer (same kind and entry), it is returned unchanged."""
    kind = entry.get("kind")
    spec = _KINDS.get(kind)
    if spec is None:
        raise ValueError(
            f"compression plan: layer {name!r} has kind {kind!r}, which this lrkernels does not "
            f"know (known: {sorted(_KINDS)}); a newer lrkernels or a plugin registers it"
        )
    if isinstance(module, spec.module_type):
        if {"kind": kind, **spec.describe(module)} != entry:
            raise ValueError(
                f"compression plan: layer {name!r} already is a {type(module).__name__} but "
                f"differs from the plan ({spec.describe(module)} vs {entry})"
            )
        return module
    try:
        return spec.build(module, entry)
    except KeyError as exc:
        raise ValueError(
            f"compression plan: layer {name!r}: its {kind!r} entry lacks the field {exc}"
        ) from None
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"compression plan: layer {name!r}: {exc}") from None


def apply_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Converts ``model`` (in place) as the plan says: each named layer is replaced, at every
    place it is registered, by a module of the entry's kind and shapes, on the layer's device,
    its values uninitialised (load them next: `load_compressed` does both). Returns model."""
    check_plan(plan)
    modules = dict(model.named_modules(remove_duplicate=False))
    refs: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                refs.setdefault(id(child), []).append((parent, attr))
    for name, entry in plan["layers"].items():
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"compression plan: the model has no module {name!r} (was it built with the "
                "same configuration as the saved one?)"
            )
        new = build_layer(module, entry, name)
        if new is not module:
            for parent, attr in refs.get(id(module), []):
                setattr(parent, attr, new)
    return model


# ---------------------------------------------------------------------------------- files


def save_compressed(
    model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    """Writes ``model``'s state_dict and its `compression_plan` to one safetensors file.

    Tied tensors are stored once (`safetensors.torch.save_model`). ``metadata``: extra
    string pairs for the file's header. Returns the plan written.
    """
    from safetensors.torch import save_model

    plan = compression_plan(model)
    meta = {} if metadata is None else dict(metadata)
    if METADATA_KEY in meta:
        raise ValueError(f"metadata key {METADATA_KEY!r} is reserved for the plan")
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
    meta[METADATA_KEY] = json.dumps(plan, sort_keys=True)
    save_model(model, os.fspath(path), metadata=meta)
    return plan


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """The plan stored in a file written by `save_compressed`."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise ValueError(
            f"{os.fspath(path)!r} holds no lrkernels plan (not written by "
            "lrkernels.nn.save_compressed); load a plain state_dict with load_state_dict"
        )
    return check_plan(json.loads(meta[METADATA_KEY]))


def load_compressed(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True
) -> dict[str, Any]:
    """Loads a file written by `save_compressed` into ``model`` — a freshly built,
    uncompressed model of the same architecture (or one already converted the same way).

    Applies the stored plan (`apply_plan`: the listed layers become `LowRankLinear` /
    `Int8Linear` / ... of the saved shapes, without calibration data or SVD), then loads every
    tensor (`safetensors.torch.load_model`; ``strict`` as in ``load_state_dict``). Dense
    tensors take the model's dtype (as ``load_state_dict``); `Int8Linear` layers take the
    file's scale dtype. Returns the plan.
    """
    from safetensors.torch import load_model

    plan = read_plan(path)
    apply_plan(model, plan)
    load_model(model, os.fspath(path), strict=strict)
    return plan


# ------------------------------------------------------------------- the built-in kinds


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _check_linear(module: nn.Module, entry: dict[str, Any]) -> None:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"expected an nn.Linear to convert, found a {type(module).__name__}")
    want = (entry["in_features"], entry["out_features"], entry["bias"])
    have = (module.in_features, module.out_features, module.bias is not None)
    if want != have:
        raise ValueError(
            f"the model's layer has (in_features, out_features, bias) = {have}, the plan {want}"
        )


def _describe_lowrank(module) -> dict[str, Any]:
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "rank": module.rank,
        "bias": module.bias is not None,
    }


def _build_lowrank(linear: nn.Module, entry: dict[str, Any]) -> nn.Module:
    _check_linear(linear, entry)
    weight = linear.weight
    new = LowRankLinear(
        linear.in_features, linear.out_features, entry["rank"], bias=entry["bias"],
        device="meta", dtype=weight.dtype,
    ).to_empty(device=weight.device)  # fmt: skip
    new.U.requires_grad_(weight.requires_grad)
    new.V.requires_grad_(weight.requires_grad)
    if linear.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new.train(linear.training)


def _describe_int8(module) -> dict[str, Any]:
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "group_size": module.group_size,
        "dtype": _dtype_name(module.dtype),
        "bias": module.bias is not None,
        # The layout of the tensors in the file: state_dict always holds the portable layout 1
        # (an Int8Linear packed for CUDA unpacks on save), whatever the module runs on.
        "layout": 1,
    }


def _build_int8(linear: nn.Module, entry: dict[str, Any]) -> nn.Module:
    _check_linear(linear, entry)
    if entry.get("layout", 1) != 1:
        raise ValueError(f"int8 layout {entry['layout']} is not known to this lrkernels")
    new = Int8Linear(
        linear.in_features, linear.out_features, bias=entry["bias"],
        group_size=entry["group_size"] or None, device=linear.weight.device,
        dtype=_dtype_from_name(entry["dtype"]),
    )  # fmt: skip
    if linear.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new.train(linear.training)


def _describe_lora(module) -> dict[str, Any]:
    if module.merged:
        raise ValueError(
            "a merged LoRALinear holds W + s·B·A in its base: unmerge() it to save base and "
            "adapter, or save merged_module() instead"
        )
    base = module.base
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": base.bias is not None,
        "r": module.r,
        "alpha": module.alpha,
        "rslora": module.rslora,
        "dropout": module.dropout,
        "base": {"kind": "int8", **_describe_int8(base)}
        if isinstance(base, Int8Linear)
        else {"kind": "dense"},
    }


def _build_lora(linear: nn.Module, entry: dict[str, Any]) -> nn.Module:
    """LoRALinear around the fresh model's own nn.Linear (a dense base: the file overwrites its
    weight) or around the int8 layer its nested entry describes."""
    _check_linear(linear, entry)
    base_entry = entry["base"]
    if base_entry.get("kind") == "dense":
        base = linear
    elif base_entry.get("kind") == "int8":
        base = _build_int8(linear, base_entry)
    else:
        raise ValueError(f"a LoRA base must be dense or int8, got {base_entry!r}")
    new = LoRALinear(base, entry["r"], entry["alpha"], entry["dropout"], entry["rslora"])
    return new.train(linear.training)


register_plan_kind("lowrank", LowRankLinear, _describe_lowrank, _build_lowrank)
register_plan_kind("int8", Int8Linear, _describe_int8, _build_int8)
register_plan_kind("lora", LoRALinear, _describe_lora, _build_lora)

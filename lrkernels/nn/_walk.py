"""Finding the nn.Linear layers of a model to replace: shared by the model-level converters
(`lrkernels.nn.factorize_linears`, `lrkernels.nn.quantize_linears`, ...)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..factorize import GramAccumulator

NameFilter = Callable[[str], bool] | str | re.Pattern | None


def name_predicate(arg: NameFilter, what: str) -> Callable[[str], bool] | None:
    """None, a regex (matched with re.search) or a callable name -> bool, as a predicate."""
    if arg is None:
        return None
    if isinstance(arg, str | re.Pattern):
        try:
            pattern = re.compile(arg)
        except re.error as exc:
            raise ValueError(f"{what} is not a valid regular expression: {exc}") from None
        return lambda name: pattern.search(name) is not None
    if callable(arg):
        return lambda name: bool(arg(name))
    raise ValueError(f"{what} must be a callable name -> bool or a regex string, got {arg!r}")


@dataclass
class LinearIndex:
    """Every nn.Linear of a model, keyed by id(module).

    refs: every (parent, attribute) that references the layer (a shared layer has several);
    first_name: its first-seen dotted name; linears: the module; mha_owned: layers owned by an
    nn.MultiheadAttention (which reads ``out_proj.weight`` instead of calling the layer: they
    are replaced like any other, see `lrkernels.nn._weight`, but never see calibration inputs);
    owners: per id(parameter), how many modules own it (tied weights have more than one).
    """

    refs: dict[int, list[tuple[nn.Module, str]]] = field(default_factory=dict)
    first_name: dict[int, str] = field(default_factory=dict)
    linears: dict[int, nn.Linear] = field(default_factory=dict)
    mha_owned: set[int] = field(default_factory=set)
    owners: dict[int, int] = field(default_factory=dict)


def index_linears(model: nn.Module) -> LinearIndex:
    index = LinearIndex()
    seen_refs: set[tuple[int, str]] = set()
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if not isinstance(child, nn.Linear):
                continue
            key = id(child)
            if (id(parent), attr) not in seen_refs:
                seen_refs.add((id(parent), attr))
                index.refs.setdefault(key, []).append((parent, attr))
            if key not in index.first_name:
                index.first_name[key] = f"{parent_name}.{attr}" if parent_name else attr
                index.linears[key] = child
            if isinstance(parent, nn.MultiheadAttention):
                index.mha_owned.add(key)
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                index.owners[id(p)] = index.owners.get(id(p), 0) + 1
    return index


def warn_if_nothing_selected(
    who: str, index: LinearIndex, include: NameFilter, exclude: NameFilter, selected: int
) -> None:
    """A converter whose filters select no layer says so (a typo in ``include`` otherwise
    passes silently as "0 of 0 selected layers")."""
    if selected:
        return
    names = list(index.first_name.values())
    if not names:
        warnings.warn(f"{who}: the model has no nn.Linear layer; nothing to convert", stacklevel=3)
        return
    shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
    filters = ", ".join(
        f"{what}={arg!r}" for what, arg in (("include", include), ("exclude", exclude)) if arg
    )
    warnings.warn(
        f"{who}: {filters or 'the filters'} selected none of the model's {len(names)} nn.Linear "
        f"layers ({shown}); nothing was converted",
        stacklevel=3,
    )


def _reraise(exc: BaseException, message: str):
    try:
        new = type(exc)(message)
    except Exception:  # an exception type with another constructor
        new = RuntimeError(message)
    raise new from exc


def calibrate(
    who: str,
    model: nn.Module,
    layers: list[tuple[nn.Module, str]],
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any],
    *,
    gram_device: torch.device | str | None = None,
) -> dict[int, GramAccumulator]:
    """Accumulates each layer's input Gram matrix ``XᵀX`` (float64, `GramAccumulator`) over
    ``forward_fn(model, batch)`` for every batch, under ``torch.no_grad()``.

    ``layers``: (layer, name) pairs; a layer listed twice is hooked once. Forward pre-hooks do
    the accumulation; they are removed afterwards, also when a forward raises. An error is
    re-raised naming the batch and, when it happened in (or on the input of) one of the
    layers, that layer — e.g. a calibration batch of the wrong width.
    Returns ``{id(layer): accumulator}``.
    """
    grams: dict[int, GramAccumulator] = {}
    running: list[str] = []  # names of hooked layers whose forward has started, not finished
    handles = []

    def make_pre_hook(acc: GramAccumulator, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            running.append(name)
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor):
                acc.update(x)  # raises for an input of the wrong width, named below

        return hook

    def post_hook(module, args, output) -> None:
        if running:
            running.pop()

    try:
        for layer, name in layers:
            if id(layer) in grams:
                continue
            acc = GramAccumulator(layer.in_features, device=gram_device)
            grams[id(layer)] = acc
            pre_hook = make_pre_hook(acc, name)
            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook))
        with torch.no_grad():
            for i, batch in enumerate(batches):
                running.clear()
                try:
                    forward_fn(model, batch)
                except Exception as exc:
                    if not running:
                        raise
                    where = f"{who}: calibration batch {i} failed in layer {running[-1]!r}"
                    _reraise(exc, f"{where}: {exc}")
    finally:
        for handle in handles:
            handle.remove()
    return grams

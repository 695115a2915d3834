"""Finding the nn.Linear layers of a model to replace: shared by the model-level converters
(`lrkernels.nn.factorize_linears`, `lrkernels.nn.quantize_linears`, ...)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

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
    nn.MultiheadAttention (which reads ``.weight`` directly, so they cannot be replaced);
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

"""Keeping every weight an adapter may replace through the dynamo exporter's graph optimizer.

The optimizer folds what it can prove constant: an all-zero bias disappears (``x @ W + 0`` is ``x @ W``),
equal tensors are merged into one initializer, and a table read at constant positions becomes the slice.
A freshly initialized head's ``classifier.bias`` is all zeros, so an adapter that replaces it (PEFT's
``modules_to_save``) would find nothing to replace. The weights the optimizer would treat so (uniform
values, equal to another weight, embedding tables) are hidden from it as graph inputs without a value
while it runs, then restored as the initializers they were.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def foldable_parameters(model: nn.Module) -> set[str]:
    """Names of ``model``'s parameters and buffers the optimizer could fold away or merge with another:
    those whose elements are all equal (zeros, ones), those equal in value to another tensor, and
    embedding tables (read at constant positions, they fold into a slice)."""
    found: set[str] = set()
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
            continue
        data = t.detach()
        flat = data.reshape(-1)
        # A strided sample decides cheaply; only tensors it cannot tell apart are read in full.
        sample = flat[:: max(1, flat.numel() // 64)]
        if bool((sample == flat[0]).all()) and bool((flat == flat[0]).all()):
            found.add(name)
        if id(t) in seen:  # a tied weight is one tensor: sharing its initializer is right
            continue
        seen.add(id(t))
        key = (tuple(data.shape), data.dtype, tuple(sample.tolist()))
        groups.setdefault(key, []).append((name, data))
    for members in groups.values():
        for i, (name, data) in enumerate(members):
            if any(torch.equal(data, other) for _, other in members[:i] + members[i + 1 :]):
                found.add(name)
    # An embedding read at constant positions (GPT-2's ``wpe`` in a static export) folds into a slice
    # of itself; kept as a table, a lookup costs nothing and LoRA can still target it.
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and isinstance(module.weight, torch.Tensor):
            found.add(f"{name}.weight" if name else "weight")
    return found


def optimize_keeping(program: Any, names: set[str]) -> None:
    """Run the dynamo ``ONNXProgram``'s optimizer without letting it fold or merge the initializers
    ``names`` (graph inputs without a value are opaque to it); they are initializers again after."""
    graph = program.model.graph
    hidden = []
    for name in sorted(names):
        value = graph.initializers.get(name)
        if value is None or value.const_value is None:
            continue
        hidden.append((value, value.const_value))
        graph.initializers.pop(name)
        value.const_value = None
        graph.inputs.append(value)
    try:
        program.optimize()
    finally:
        graph = program.model.graph
        for value, tensor in hidden:
            if value in graph.inputs:
                graph.inputs.remove(value)
            value.const_value = tensor
            if value.uses() and value.name not in graph.initializers:
                graph.register_initializer(value)

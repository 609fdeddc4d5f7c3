"""PEFT's adapter swap in PyTorch, beside ``MergedSession.switch`` in benchmarks/hot_swap.py."""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def peft_swap(work: Path, cycles: int, threads: int = 1) -> dict:
    """PEFT's swap in PyTorch: unmerge the active adapter, merge the other (merge_adapter/unmerge_adapter).

    ``threads``: torch threads (1, as numpy's BLAS for the switch: on a busy 2-core VM two OpenMP threads made
    each of the swap's small products wait on a descheduled thread: 0.4–2.7 s per swap instead of ~40 ms
    on the 162M model, 2026-12-07)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    base = LlamaForCausalLM.from_pretrained(work / "torch_base", torch_dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, work / "a1", adapter_name="a1")
        model.load_adapter(str(work / "a2"), adapter_name="a2")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    times = []
    model.set_adapter("a1")
    model.merge_adapter()
    merged_a1 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(cycles):
            t = time.perf_counter()
            model.unmerge_adapter()
            model.set_adapter("a2" if i % 2 == 0 else "a1")
            model.merge_adapter()
            times.append(time.perf_counter() - t)
        if cycles % 2:
            model.unmerge_adapter()
            model.set_adapter("a1")
            model.merge_adapter()
    drift = max((p.detach() - merged_a1[n]).abs().max().item() for n, p in model.named_parameters() if n in merged_a1)
    model.unmerge_adapter()
    base_drift = max((p.detach() - weights[n]).abs().max().item() for n, p in model.named_parameters() if n in weights)
    return {"swap_ms": _median_ms(times), "cycles": cycles, "drift_max_abs_a1": drift, "drift_max_abs_base": base_drift}

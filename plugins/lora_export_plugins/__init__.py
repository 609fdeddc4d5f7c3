"""First-party op layouts for lora-export, outside the core: each module registers layouts for ops the
core does not know (quantized and packed weights) through the ``lora_export.op_layouts`` entry point.

A layout subclasses ``lora_export.graph.ops.layouts.OpLayout`` (read the weight in canonical layout, write one
back in the op's storage, add a LoRA side branch) and is registered by a function the entry point names.
"""

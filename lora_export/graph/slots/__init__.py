"""Adapter mode's slots: the tensors that fill an injected model's LoRA inputs, VeRA's vector-only slots,
and the LoRA inputs of models made by other tools."""

"""Adapter files: PEFT's folder format both ways, safetensors (bf16 too), slot tensors (.onnx_adapter)."""

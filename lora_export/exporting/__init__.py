"""torch → ONNX: export a copy of the base model with the LoRA target manifest."""

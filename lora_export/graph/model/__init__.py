"""An ONNX model file: validated loading, external data, atomic and patched saves, and the metadata
lora-export stores in a model (its history, the slot manifest)."""

"""How PyTorch modules show up in a graph: module paths in ONNX names and metadata, base weights by value."""

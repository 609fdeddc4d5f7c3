"""ONNX graph rewriting: model I/O, op layouts, target resolution, merge, and adapter-mode slots."""

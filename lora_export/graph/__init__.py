"""ONNX graph rewriting, by job from the bottom up: ``model`` (I/O, checks, metadata), ``match`` (names,
values), ``ops`` (layouts, branches, packed projections), ``targets`` (resolution), ``slots`` (adapter
mode), ``verbs`` (merge, inject, convert, inspect)."""

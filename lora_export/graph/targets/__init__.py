"""Target resolution: the graph weight each LoRA target adapts (by manifest, name, scope, value, packed
slice, the genai builder's names), or the proof that it is absent."""

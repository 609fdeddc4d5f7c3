"""What each op does with its weight: the layout registry (plugins extend it), LoRA side branches, the
nodes that read a weight, packed projections, quantized ops turned float."""

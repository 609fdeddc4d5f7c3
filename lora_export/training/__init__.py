"""Training in PyTorch: LoraConfig, the LoRA/DoRA layers, attaching and saving, LoRA+ groups."""

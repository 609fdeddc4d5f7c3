"""Training in PyTorch: the LoRA/DoRA layers, attaching and saving, LoRA+ groups (configs: ``core``)."""

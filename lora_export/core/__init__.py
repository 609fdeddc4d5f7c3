"""The canonical adapter, torch-free: ``LoraConfig`` and its target patterns, the VeRA and AdaLoRA configs,
``Adapter``/``LoraTarget``, and the ΔW/DoRA math. Every other layer builds on it; it imports only
``errors`` and ``safejson`` (torch only inside VeRA's projection generator)."""

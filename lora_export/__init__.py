"""lora-export: LoRA from PyTorch training to ONNX deployment."""

from .adapter import Adapter, LoraTarget
from .config import LoraConfig
from .errors import (
    AdapterError,
    ConfigError,
    LoraExportError,
    ModelError,
    ShapeError,
    TargetError,
    VerificationError,
)
from .peft_format import load_adapter, save_adapter_files

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterError",
    "ConfigError",
    "LoraConfig",
    "LoraExportError",
    "LoraTarget",
    "ModelError",
    "ShapeError",
    "TargetError",
    "VerificationError",
    "load_adapter",
    "save_adapter_files",
]

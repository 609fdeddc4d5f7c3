"""lora-export: LoRA from PyTorch training to ONNX deployment."""

from typing import TYPE_CHECKING

from ._version import __version__ as __version__
from .errors import (
    AdapterError,
    ConfigError,
    DtypeError,
    LoraExportError,
    MissingExtraError,
    ModelError,
    ShapeError,
    TargetError,
    VerificationError,
)

if TYPE_CHECKING:
    # The public API as type checkers and IDEs see it; at run time ``__getattr__`` imports each name on
    # first use (keep in step with _LAZY_API and _TORCH_API), so ``import lora_export`` and the CLI's
    # start-up import neither numpy, onnx nor torch.
    from .core.adalora_config import AdaLoraConfig
    from .core.adapter import Adapter, LoraTarget
    from .core.config import LoraConfig
    from .core.vera import VeraConfig
    from .exporting.exporter import export, export_with_manifest
    from .formats.init_conversion import convert_init_adapter
    from .formats.peft import load_adapter, save_adapter_files
    from .graph.targets.resolve import Resolution, ResolvedTarget, resolve_targets
    from .graph.verbs.convert import convert_adapter, write_zero_adapter
    from .graph.verbs.folder_ops import inject_folder, merge_folder
    from .graph.verbs.inject import InjectResult, inject_adapters, inject_files
    from .graph.verbs.merge import merge_adapter, merge_file
    from .graph.verbs.merge_report import MergeReport
    from .runtime.folder_session import LoraFolderSession
    from .runtime.merged_session import MergedSession
    from .runtime.session import LoraSession
    from .runtime.verify import VerifyReport, verify_models
    from .training.adalora import AdaLoraLinear, RankAllocator, attach_adalora, orth_regularization
    from .training.attach import (
        adapter_from_model,
        attach_lora,
        lora_layers,
        lora_summary,
        merge_lora,
        remove_lora,
        save_adapter,
        unmerge_lora,
        unwrap,
    )
    from .training.delta_lora import DeltaLora
    from .training.layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
    from .training.lora_drop import LoraDropPlan, apply_lora_drop, lora_importance
    from .training.lora_fa import attach_lora_fa, freeze_lora_a, saved_activation_bytes
    from .training.loraplus import loraplus_param_groups
    from .training.vera import VeraLinear

# The torch-free API: imported on first use so that start-up stays light.
_LAZY_API = {
    "Adapter": "core.adapter",
    "LoraTarget": "core.adapter",
    "convert_init_adapter": "formats.init_conversion",
    "load_adapter": "formats.peft",
    "save_adapter_files": "formats.peft",
    "convert_adapter": "graph.verbs.convert",
    "write_zero_adapter": "graph.verbs.convert",
    "InjectResult": "graph.verbs.inject",
    "inject_adapters": "graph.verbs.inject",
    "inject_files": "graph.verbs.inject",
    "merge_adapter": "graph.verbs.merge",
    "merge_file": "graph.verbs.merge",
    "MergeReport": "graph.verbs.merge_report",
    "Resolution": "graph.targets.resolve",
    "ResolvedTarget": "graph.targets.resolve",
    "resolve_targets": "graph.targets.resolve",
    "LoraSession": "runtime.session",
    "LoraFolderSession": "runtime.folder_session",
    "MergedSession": "runtime.merged_session",
    "inject_folder": "graph.verbs.folder_ops",
    "merge_folder": "graph.verbs.folder_ops",
    "VerifyReport": "runtime.verify",
    "verify_models": "runtime.verify",
    "AdaLoraConfig": "core.adalora_config",
    "LoraConfig": "core.config",
    "VeraConfig": "core.vera",
}

# The training and export API needs torch (the ``lora-export[train]`` extra).
_TORCH_API = {
    "adapter_from_model": "training.attach",
    "attach_lora": "training.attach",
    "lora_layers": "training.attach",
    "lora_summary": "training.attach",
    "merge_lora": "training.attach",
    "remove_lora": "training.attach",
    "save_adapter": "training.attach",
    "unmerge_lora": "training.attach",
    "unwrap": "training.attach",
    "export": "exporting.exporter",
    "export_with_manifest": "exporting.exporter",
    "LoraConv": "training.layers",
    "LoraEmbedding": "training.layers",
    "LoraLayer": "training.layers",
    "LoraLinear": "training.layers",
    "loraplus_param_groups": "training.loraplus",
    "AdaLoraLinear": "training.adalora",
    "RankAllocator": "training.adalora",
    "attach_adalora": "training.adalora",
    "orth_regularization": "training.adalora",
    "attach_lora_fa": "training.lora_fa",
    "freeze_lora_a": "training.lora_fa",
    "saved_activation_bytes": "training.lora_fa",
    "VeraLinear": "training.vera",
    "DeltaLora": "training.delta_lora",
    "LoraDropPlan": "training.lora_drop",
    "apply_lora_drop": "training.lora_drop",
    "lora_importance": "training.lora_drop",
}


def __getattr__(name: str):
    import importlib

    module = _LAZY_API.get(name)
    if module is not None:
        return getattr(importlib.import_module(f".{module}", __name__), name)
    module = _TORCH_API.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_export' has no attribute {name!r}")
    from .errors import require_torch

    require_torch(f"lora_export.{name}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_API) | set(_TORCH_API))


__all__ = [
    "LoraFolderSession",
    "inject_folder",
    "merge_folder",
    "AdaLoraConfig",
    "AdaLoraLinear",
    "RankAllocator",
    "attach_adalora",
    "orth_regularization",
    "attach_lora_fa",
    "freeze_lora_a",
    "saved_activation_bytes",
    "Adapter",
    "AdapterError",
    "ConfigError",
    "DtypeError",
    "LoraConfig",
    "VeraConfig",
    "VeraLinear",
    "LoraExportError",
    "MissingExtraError",
    "LoraTarget",
    "MergeReport",
    "ModelError",
    "Resolution",
    "ResolvedTarget",
    "ShapeError",
    "TargetError",
    "VerificationError",
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "adapter_from_model",
    "attach_lora",
    "load_adapter",
    "merge_adapter",
    "merge_file",
    "resolve_targets",
    "lora_layers",
    "lora_summary",
    "loraplus_param_groups",
    "merge_lora",
    "remove_lora",
    "save_adapter",
    "save_adapter_files",
    "unmerge_lora",
    "unwrap",
    "export",
    "export_with_manifest",
    "VerifyReport",
    "verify_models",
    "InjectResult",
    "LoraSession",
    "MergedSession",
    "convert_adapter",
    "write_zero_adapter",
    "convert_init_adapter",
    "DeltaLora",
    "LoraDropPlan",
    "apply_lora_drop",
    "lora_importance",
    "inject_adapters",
    "inject_files",
]

"""LoRA wrapper layers for training: Linear (and HF Conv1D), ConvNd and Embedding, with DoRA.

Each wrapper keeps the original module as ``base_layer`` and adds ``lora_A``/``lora_B`` (PEFT's tensor
layouts, see ``adapter``) and, for DoRA, ``lora_magnitude`` (1-D, one entry per output channel).
The forward passes follow PEFT's operation order so outputs agree to float rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import LoraTarget
from ..core.delta import check_mergeable, dora_scale, expand_channel, lora_delta, merged_weight
from ..errors import ShapeError

# Set on each LoRA layer of a group that shares one LoRA (LoRA-drop): the group's name, after which the
# adapter file's tensors and the injected model's slot inputs are named.
SHARED_GROUP_ATTR = "shared_group"


def _hf_conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


class LoraLayer(nn.Module):
    """Common state of the LoRA wrappers: ΔW = scale · B·A added to ``base_layer``'s output."""

    kind: str = "linear"

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = int(r)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude: nn.Parameter | None = None
        self.merged = False
        self._dora_merge_scale: np.ndarray | None = None

    # -- weights in the module's own (torch) layout ----------------------------------------
    @property
    def fan_in_fan_out(self) -> bool:
        return False

    def _weight_torch_layout(self) -> torch.Tensor:
        """W0 in the layout ΔW uses (out, in, ...); HF Conv1D stores it transposed."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def _new_param(self, *shape: int) -> nn.Parameter:
        w = self.base_layer.weight
        return nn.Parameter(torch.empty(*shape, device=w.device, dtype=w.dtype))

    def reset_lora(self, init: str) -> None:
        """PEFT's init: A kaiming-uniform (a=√5, as nn.Linear) or N(0, 1/r); B zeros, so ΔW starts at 0."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters training updates: A, B and, for DoRA, the magnitude."""
        return [p for p in (self.lora_A, self.lora_B, self.lora_magnitude) if p is not None]

    def _lora_weight(self) -> torch.Tensor:
        """B·A in the layout of ``_weight_torch_layout`` (unscaled), as PEFT's DoRA computes it."""
        raise NotImplementedError

    def _weight_norm(self) -> torch.Tensor:
        """‖W0 + s·BA‖ per output channel (embedding: per dim column), with BA detached as in PEFT."""
        w = self._weight_torch_layout()
        total = w + self.scale * self._lora_weight().detach().to(w.dtype)
        if self.kind == "embedding":
            return torch.linalg.norm(total, dim=0)
        return torch.linalg.norm(total.flatten(1), dim=1)

    def dora_gain(self) -> torch.Tensor:
        """m / ‖W0 + s·BA‖; no gradient flows through the norm (DoRA paper §4.3, as PEFT)."""
        return self.lora_magnitude / self._weight_norm().detach()

    def init_dora(self) -> None:
        """Add the DoRA magnitude, initialised to ‖W0 + s·BA‖ so the layer starts unchanged."""
        with torch.no_grad():
            self.lora_magnitude = nn.Parameter(self._weight_norm().clone())

    # -- canonical form and merging ------------------------------------------------------------
    def to_target(self, name: str) -> LoraTarget:
        """This layer's adapter as the canonical, torch-free LoraTarget."""
        mag = None if self.lora_magnitude is None else _np(self.lora_magnitude)
        return LoraTarget(
            name=name,
            kind=self.kind,
            A=_np(self.lora_A),
            B=_np(self.lora_B),
            scale=self.scale,
            magnitude=mag,
            fan_in_fan_out=self.fan_in_fan_out,
        )

    def load_target(self, t: LoraTarget, name: str) -> None:
        """Copy A, B and magnitude from a LoraTarget; ShapeError when they do not fit."""
        pairs = [("lora_A", self.lora_A, t.A), ("lora_B", self.lora_B, t.B)]
        if t.magnitude is not None:
            pairs.append(("magnitude", self.lora_magnitude, t.magnitude))
        for what, param, arr in pairs:
            if param is None or tuple(param.shape) != tuple(arr.shape):
                have = None if param is None else tuple(param.shape)
                raise ShapeError(f"{name}: adapter {what} has shape {tuple(arr.shape)}, the model needs {have}")
            with torch.no_grad():
                param.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(param.dtype))
        self.scale = float(t.scale)

    def _w0_numpy(self) -> np.ndarray:
        return _np(self._weight_torch_layout())

    def _store_weight(self, w: np.ndarray) -> None:
        # One rounding: the float32 result is cast once into the stored dtype.
        new = torch.from_numpy(np.ascontiguousarray(w))
        if self.fan_in_fan_out:
            new = new.T
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype))

    def merge(self, name: str = "layer") -> None:
        """Fold s·BA (DoRA: PEFT's m·(W0+ΔW)/‖W0+ΔW‖) into the base weight."""
        if self.merged:
            return
        t = self.to_target(name)
        check_mergeable(t)
        w0 = self._w0_numpy()
        if t.magnitude is not None:
            self._dora_merge_scale = dora_scale(w0, lora_delta(t), t.magnitude, t.kind)
        self._store_weight(merged_weight(w0, t))
        self.merged = True

    def unmerge(self) -> None:
        """Undo ``merge`` (DoRA divides by the gain cached at merge time, as PEFT does)."""
        if not self.merged:
            return
        t = self.to_target("layer")
        w = self._w0_numpy()
        if self._dora_merge_scale is not None:
            w = w / expand_channel(self._dora_merge_scale, t.kind, w.ndim)
            self._dora_merge_scale = None
        self._store_weight(w - lora_delta(t))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, dora={self.lora_magnitude is not None}"


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear or transformers' Conv1D (weight stored (in, out): fan_in_fan_out)."""

    kind = "linear"

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, scale, dropout)
        conv1d = _hf_conv1d_type()
        self._fan_in_fan_out = conv1d is not None and isinstance(base_layer, conv1d)
        out_f, in_f = self._weight_torch_layout().shape
        self.lora_A = self._new_param(r, in_f)
        self.lora_B = self._new_param(out_f, r)

    @property
    def fan_in_fan_out(self) -> bool:
        return self._fan_in_fan_out

    def _lora_weight(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        x = x.to(self.lora_A.dtype)
        if self.lora_magnitude is None:
            return (result + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale).to(out_dtype)
        # DoRA: m/‖W‖ rescales the base output; with active dropout PEFT recomputes x·W0 on the dropped input.
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = result
            bias = self.base_layer.bias
            if bias is not None:
                base = base - bias
        else:
            x = self.dropout(x)
            base = F.linear(x, self._weight_torch_layout().to(x.dtype))
        g = self.dora_gain().view(1, -1)
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return (result + (g - 1) * base + g * lora * self.scale).to(out_dtype)


_CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


class LoraConv(LoraLayer):
    """LoRA on nn.Conv1d/2d/3d as PEFT: A = conv(in→r, base kernel/stride/padding), B = 1x1 conv(r→out, groups)."""

    kind = "conv"

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, scale, dropout)
        w = base_layer.weight
        self.groups = base_layer.groups
        self.conv_fn = _CONV_FN[w.dim()]
        ones = [1] * (w.dim() - 2)
        self.lora_A = self._new_param(r, base_layer.in_channels, *base_layer.kernel_size)
        self.lora_B = self._new_param(base_layer.out_channels, r // self.groups, *ones)

    def _lora_weight(self) -> torch.Tensor:
        # PEFT's DoRA conv weight: the flattened 1x1 B times the flattened A (groups == 1).
        return (self.lora_B.reshape(-1, self.r) @ self.lora_A.reshape(self.r, -1)).reshape(self.base_layer.weight.shape)

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        h = self.conv_fn(x, self.lora_A, None, base.stride, base.padding)
        return self.conv_fn(h, self.lora_B, None, 1, 0, 1, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        out_dtype = result.dtype
        x = x.to(self.lora_A.dtype)
        if self.lora_magnitude is None:
            return (result + self._lora_branch(self.dropout(x)) * self.scale).to(out_dtype)
        base_layer = self.base_layer
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = result
            if base_layer.bias is not None:
                base = base - base_layer.bias.view(1, -1, *([1] * (result.dim() - 2)))
        else:
            x = self.dropout(x)
            base = self.conv_fn(
                x,
                base_layer.weight,
                None,
                base_layer.stride,
                base_layer.padding,
                base_layer.dilation,
                base_layer.groups,
            )
        g = self.dora_gain().view(1, -1, *([1] * (result.dim() - 2)))
        return (result + (g - 1) * base + g * self._lora_branch(x) * self.scale).to(out_dtype)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: A (r, num) is looked up like the base table, then projected by B (dim, r).

    As in PEFT, lora_dropout does not apply to embeddings.
    """

    kind = "embedding"

    def __init__(self, base_layer: nn.Embedding, r: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, scale, 0.0)
        num, dim = base_layer.weight.shape
        self.lora_A = self._new_param(r, num)
        self.lora_B = self._new_param(dim, r)

    def reset_lora(self, init: str) -> None:
        # PEFT (after loralib) for both init choices: A zeros, B standard normal.
        with torch.no_grad():
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _lora_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).T

    def _embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        return F.embedding(x, table, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        out_dtype = result.dtype
        lora = (self._embed(x, self.lora_A.T) @ self.lora_B.T) * self.scale
        # Scaled embeddings (e.g. Gemma's) multiply their own output; PEFT scales the LoRA part to match.
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        if embed_scale is not None:
            lora = lora * torch.as_tensor(embed_scale, dtype=lora.dtype, device=lora.device)
        if self.lora_magnitude is None:
            return (result + lora).to(out_dtype)
        g = self.dora_gain()
        return (g * result + g * lora).to(out_dtype)

"""ONNX Runtime's block-quantized ``MatMulNBits`` (com.microsoft; int4, also 2/8 bits) as a LoRA target.

MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?) computes Y = A · deq(B)ᵀ (+ bias), with
deq(B)[n, k] = (q[n, k] − zp[n, k // block_size]) · scale[n, k // block_size]: B is uint8
(N, n_blocks, blob_size), each column's codes packed low bits first along K; scales (N·n_blocks) or
(N, n_blocks) in the activations' float dtype; zero points packed the same way per column (uint8), or
float (N, n_blocks); absent means 2^(bits−1) (8 for int4). The canonical weight is deq(B), (N, K).

- ``inject`` adds the LoRA branch in float beside the quantized op (``MatMul(MatMul(A, A′), B′)``), so the
  adapter is exact and the rank-0 default is the base model bit for bit.
- ``merge`` dequantizes, adds ΔW in float32, and requantizes with the node's own block size and scheme
  (symmetric without zero points, asymmetric with them) exactly as ORT's quantizer (MLAS
  ``MlasQuantizeBlockwise``) does: round to nearest, ties away from zero. Rounding to 4 bits loses part of
  ΔW; ``last_write_report`` records how much, and the merge report shows it per target.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lora_export.errors import ModelError, ShapeError
from lora_export.graph.ops.layouts import InputWeight, OpLayout, register_layout, store

_A, _B, _SCALES, _ZP, _GIDX, _BIAS = range(6)


def _attr(node: ir.Node, name: str, default: int | None = None) -> int | None:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _const(node: ir.Node, i: int) -> ir.Value | None:
    value = _input(node, i)
    return value if value is not None and value.const_value is not None else None


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: to nearest, ties away from zero (numpy's round is ties-to-even)."""
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0).astype(x.dtype)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """(rows, bytes) uint8 → (rows, count) codes, low bits first."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :count]


def _pack(codes: np.ndarray, bits: int, nbytes: int, fill: int) -> np.ndarray:
    """(rows, count) codes → (rows, nbytes) uint8, low bits first; padding codes are ``fill``."""
    per = 8 // bits
    rows, count = codes.shape
    full = np.full((rows, nbytes * per), fill, dtype=np.uint8)
    full[:, :count] = codes
    full = full.reshape(rows, nbytes, per).astype(np.uint16)
    shifts = (np.arange(per, dtype=np.uint16) * bits).astype(np.uint16)
    return (full << shifts).sum(axis=-1).astype(np.uint8)


def quantize_blockwise(
    w: np.ndarray, k: int, bits: int, bs: int, symmetric: bool, scale_dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ORT's blockwise quantization (MLAS ``MlasQuantizeBlockwise``, bit for bit) of ``w`` (rows, K), blocks of
    ``bs`` along K: (codes (rows, n_blocks·bs) uint8, scales (rows, n_blocks) in ``scale_dtype``, zero points
    (rows, n_blocks) uint8 or None when ``symmetric``)."""
    n = int(np.shape(w)[0])  # any rows: each output column is quantized on its own
    n_blocks = -(-k // bs)
    qmax = (1 << bits) - 1
    blocks = np.zeros((n, n_blocks * bs), dtype=np.float32)
    blocks[:, :k] = w
    blocks = blocks.reshape(n, n_blocks, bs)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)  # zero padding changes neither scheme's range
    with np.errstate(divide="ignore", invalid="ignore"):
        if symmetric:
            m = np.where(np.abs(hi) > np.abs(lo), hi, lo)
            scales = (m / np.float32(-(1 << (bits - 1)))).astype(np.float32)
            zp = np.full((n, n_blocks), 1 << (bits - 1), dtype=np.float32)
        else:
            lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
            scales = ((hi - lo) / np.float32(qmax)).astype(np.float32)
            zp_fp = np.where(scales != 0, np.float32(0) - lo / scales, lo).astype(np.float32)
            zp = np.clip(_round_half_away(zp_fp), 0, qmax).astype(np.float32)
        scales = scales.astype(scale_dtype)
        s = scales.astype(np.float32)
        recip = np.where(s != 0, np.float32(1) / s, np.float32(0)).astype(np.float32)
    x = (blocks * recip[:, :, None]).astype(np.float32) + zp[:, :, None]
    codes = np.clip(_round_half_away(x), 0, qmax).astype(np.uint8).reshape(n, -1)
    # Past K: ORT's quantizer writes 0 to whole padding bytes and leaves stale bits in the nibbles sharing a byte
    # with the last code (they vary run to run); MatMulNBits never reads them, so 0 here.
    codes[:, k:] = 0
    return codes, scales, None if symmetric else zp.astype(np.uint8)


def dequantize_blockwise(codes: np.ndarray, scales: np.ndarray, zp: np.ndarray, k: int, bs: int) -> np.ndarray:
    """The weight (rows, K) MatMulNBits applies: (q − zp)·scale in float32 (float zero points: q·scale − zp·scale,
    as ORT computes them), then in the scales' dtype when that is not float32."""
    s = np.repeat(scales.astype(np.float32), bs, axis=1)
    if zp.dtype.kind == "f":
        z = np.repeat(zp.astype(np.float32), bs, axis=1)
        w = codes.astype(np.float32) * s - z * s
    else:
        w = (codes.astype(np.int32) - np.repeat(zp.astype(np.int32), bs, axis=1)).astype(np.float32) * s
    if scales.dtype != np.float32:
        # fp16/bf16 activations: the op's weight is the dequantized value in that dtype.
        w = w.astype(scales.dtype).astype(np.float32)
    return np.ascontiguousarray(w[:, :k])


class MatMulNBitsLayout(OpLayout):
    """com.microsoft MatMulNBits: block-quantized W (N, K), dequantized as ORT does."""

    op_type = "MatMulNBits"
    domain = "com.microsoft"
    kind = "linear"
    lossy_write = True  # merge requantizes: only with --requantize
    output_branch = True  # (x·A′)·B′ in float onto the output (DoRA aside): see add_branch

    def __init__(self) -> None:
        # The last write's requantization error (``merge`` adds it to the target's report entry).
        self.last_write_report: dict | None = None

    # -- metadata ------------------------------------------------------------------------------

    def _dims(self, node: ir.Node) -> tuple[int, int, int, int] | None:
        """(N, K, bits, block_size) when the node is a well-formed constant-weight MatMulNBits."""
        n, k, bits, bs = _attr(node, "N"), _attr(node, "K"), _attr(node, "bits", 4), _attr(node, "block_size")
        b, scales = _const(node, _B), _const(node, _SCALES)
        if None in (n, k, bs) or b is None or scales is None or bits not in (2, 4, 8) or bs <= 0:
            return None
        n_blocks = -(-k // bs)
        if tuple(int(d) for d in b.const_value.shape) != (n, n_blocks, bs * bits // 8):
            return None
        if int(np.prod([int(d) for d in scales.const_value.shape])) != n * n_blocks:
            return None
        return n, k, bits, bs

    def weight_value(self, node: ir.Node) -> ir.Value | None:
        return _const(node, _B) if self._dims(node) is not None else None

    def weight_shape(self, node: ir.Node) -> tuple[int, ...] | None:
        dims = self._dims(node)
        return None if dims is None else (dims[0], dims[1])

    def activation_dtype(self, node: ir.Node) -> ir.DataType:
        return _const(node, _SCALES).const_value.dtype

    def describe(self, node: ir.Node) -> str:
        dims = self._dims(node)
        if dims is None:
            return "MatMulNBits (unsupported form)"
        zp = _input(node, _ZP)
        scheme = "symmetric" if zp is None else "asymmetric" + (" float zp" if self._float_zp(node) else "")
        bias = ", bias" if _input(node, _BIAS) is not None else ""
        return f"MatMulNBits int{dims[2]} W(N,K) block {dims[3]} {scheme}{bias}"

    def _float_zp(self, node: ir.Node) -> bool:
        zp = _const(node, _ZP)
        return zp is not None and zp.const_value.dtype.is_floating_point()

    # -- the quantized tensors -----------------------------------------------------------------

    def _checked(self, node: ir.Node) -> tuple[int, int, int, int]:
        dims = self._dims(node)
        if dims is None:
            raise ModelError(
                f"MatMulNBits {node.name!r}: B/scales are not constants of the shapes N, K, block_size say"
            )
        if _input(node, _ZP) is not None and _const(node, _ZP) is None:
            raise ModelError(f"MatMulNBits {node.name!r}: zero_points is not a constant")
        g_idx = _input(node, _GIDX)
        if g_idx is not None:
            n, k, _bits, bs = dims
            if g_idx.const_value is None or not np.array_equal(
                g_idx.const_value.numpy().reshape(-1), np.arange(k) // bs
            ):
                raise ModelError(f"MatMulNBits {node.name!r}: a reordering g_idx is not supported")
        return dims

    def _params(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """codes (N, n_blocks·bs) uint8, scales (N, n_blocks) in their dtype, zero points (N, n_blocks)."""
        n, k, bits, bs = self._checked(node)
        n_blocks = -(-k // bs)
        codes = _unpack(_const(node, _B).const_value.numpy().reshape(n, -1), bits, n_blocks * bs)
        scales = _const(node, _SCALES).const_value.numpy().reshape(n, n_blocks)
        zp_value = _const(node, _ZP)
        if zp_value is None:
            zp = np.full((n, n_blocks), 1 << (bits - 1), dtype=np.uint8)
        elif zp_value.const_value.dtype.is_floating_point():
            zp = zp_value.const_value.numpy().reshape(n, n_blocks)
        else:
            raw = zp_value.const_value.numpy().reshape(-1)
            per_col = -(-n_blocks * bits // 8)
            if raw.size != n * per_col:
                raise ModelError(f"MatMulNBits {node.name!r}: zero_points has {raw.size} bytes, expected {n * per_col}")
            zp = _unpack(raw.reshape(n, per_col), bits, n_blocks)
        return codes, scales, zp

    def read(self, node: ir.Node) -> np.ndarray:
        _n, k, _bits, bs = self._checked(node)
        return dequantize_blockwise(*self._params(node), k, bs)

    def value_bounds(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
        """(deq(B) (N, K), per-entry bound): a float weight W quantizes to this node's codes only if
        |W − deq| ≤ bound entrywise: half a step, a whole step where the code is clamped at 0 or 2^bits − 1
        (the symmetric scheme maps the block's largest magnitude of the other sign past the top code)."""
        dims = self._dims(node)
        if dims is None:
            return None
        _n, k, bits, bs = dims
        try:
            deq = self.read(node)
            codes, scales, _ = self._params(node)
        except (ModelError, ValueError, TypeError):
            return None
        step = np.abs(np.repeat(scales.astype(np.float32), bs, axis=1))[:, :k]
        codes = codes[:, :k]
        clamped = (codes == 0) | (codes == (1 << bits) - 1)
        return deq, np.where(clamped, 1.0, 0.5) * step * (1 + 1e-3) + 1e-30

    def holds(self, node: ir.Node, w: np.ndarray) -> bool:
        """Whether ``w`` (N, K) or its transpose, rounded to the activation dtype, quantizes to this weight
        (within ``value_bounds``)."""
        shape = self.weight_shape(node)
        w = np.asarray(w)
        # Like the core's value match: W, or Wᵀ as exporters store it (both for a square W).
        views = [v for v in ((w, w.T) if w.ndim == 2 else ()) if v.shape == shape]
        bounds = self.value_bounds(node) if views else None
        if bounds is None:
            return False
        deq, bound = bounds
        dtype = self.activation_dtype(node).numpy()
        return any(bool(np.all(np.abs(v.astype(dtype).astype(np.float32) - deq) <= bound)) for v in views)

    # -- merge: requantize ---------------------------------------------------------------------

    def quantize(self, node: ir.Node, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """ORT's blockwise quantization of canonical ``w`` (rows, K) with the node's block size and scheme:
        (codes (rows, n_blocks·bs) uint8, scales (rows, n_blocks) in the scales' dtype, zero points or None)."""
        _, k, bits, bs = self._checked(node)
        scale_dtype = _const(node, _SCALES).const_value.dtype.numpy()
        return quantize_blockwise(w, k, bits, bs, _input(node, _ZP) is None, scale_dtype)

    def write(self, node: ir.Node, canonical: np.ndarray) -> None:
        self.write_rows(node, 0, canonical)

    def write_rows(self, node: ir.Node, start: int, rows: np.ndarray) -> None:
        """Requantize output columns [start, start + len(rows)) only (a packed slice): blocks run along K
        per column, so every other column's codes, scales and zero points stay bit-identical."""
        self.last_write_report = None
        n, k, bits, bs = self._checked(node)
        if self._float_zp(node):
            raise ModelError(
                f"MatMulNBits {node.name!r}: requantizing with float zero points (HQQ) is not supported; use inject"
            )
        self._refuse_shared(node)
        n_blocks = -(-k // bs)
        w = np.asarray(rows, dtype=np.float32)
        part = slice(start, start + w.shape[0])
        if w.ndim != 2 or w.shape[1] != k or part.stop > n or start < 0:
            raise ModelError(f"MatMulNBits {node.name!r}: rows [{start}:{part.stop}] of width {k} do not fit (N={n})")
        old = self.read(node)[part]
        codes, scales, zp = self.quantize(node, w)
        b_value, s_value, zp_value = _const(node, _B), _const(node, _SCALES), _const(node, _ZP)
        b = b_value.const_value.numpy().reshape(n, -1).copy()
        b[part] = _pack(codes, bits, b.shape[1], 0)
        store(b_value, b.reshape(tuple(int(d) for d in b_value.const_value.shape)))
        s_all = s_value.const_value.numpy().reshape(n, n_blocks).copy()
        s_all[part] = scales
        store(s_value, s_all.reshape(tuple(int(d) for d in s_value.const_value.shape)))
        if zp is not None:
            z_all = zp_value.const_value.numpy().reshape(n, -1).copy()
            z_all[part] = _pack(zp, bits, z_all.shape[1], 1 << (bits - 1))
            store(zp_value, z_all.reshape(tuple(int(d) for d in zp_value.const_value.shape)))
        new = self.read(node)[part]
        self.last_write_report = requantization_report(
            f"int{bits} block {bs} {'symmetric' if zp is None else 'asymmetric'}", w, old, new
        )

    def to_float(self, model: ir.Model, node: ir.Node) -> ir.Node:
        """``merge --into-float``: a float MatMul on deq(B)ᵀ in the activations' dtype (+ the bias input),
        exactly the weight this node applies (for accuracy_level 0; a higher level also rounds x)."""
        from lora_export.graph.ops.float_convert import replace_with_matmul

        self._checked(node)
        self._refuse_shared(node)
        dtype = self.activation_dtype(node)
        w = self.read(node).T.astype(dtype.numpy())
        return replace_with_matmul(model, node, node.inputs[_A], w, dtype, _input(node, _BIAS))

    def _refuse_shared(self, node: ir.Node) -> None:
        """B, scales and zero points must be read only by MatMulNBits nodes applying this same weight."""
        own = [_input(node, i) for i in (_B, _SCALES, _ZP)]
        for value in own:
            if value is None:
                continue
            for use in value.uses():
                other = use.node
                if other is node:
                    continue
                same = other.op_type == node.op_type and all(
                    _input(other, i) is v for i, v in zip((_B, _SCALES, _ZP), own)
                )
                if not same:
                    who = f"{other.op_type} {other.name!r}" if other.name else other.op_type
                    raise ModelError(
                        f"MatMulNBits {node.name!r}: its quantized tensor {value.name!r} is shared with {who}; "
                        "merging into shared quantized weights is not supported (use inject)"
                    )
            if value.is_graph_output():
                raise ModelError(f"MatMulNBits {node.name!r}: its quantized tensor {value.name!r} is a graph output")

    # -- convert: LoRA A/B fed as graph inputs (Olive's int4 LoRA models) ---------------------------

    def input_weight(self, node: ir.Node) -> InputWeight | None:
        """B, scales (and zero points) as graph inputs: the weight (N, K) the attributes fix."""
        where = f"MatMulNBits {node.name!r}"
        n, k, bits, bs = _attr(node, "N"), _attr(node, "K"), _attr(node, "bits", 4), _attr(node, "block_size")
        if None in (n, k, bs) or bits not in (2, 4, 8) or bs <= 0 or bs * bits % 8 or n <= 0 or k <= 0:
            raise ModelError(f"{where}: its N/K/bits/block_size attributes are missing or not a supported form")
        if _input(node, _GIDX) is not None or _input(node, _BIAS) is not None:
            raise ModelError(f"{where}: a g_idx or bias input on a LoRA weight is not supported")
        scales, zp = _input(node, _SCALES), _input(node, _ZP)
        if _input(node, _B) is None or scales is None or scales.dtype is None or not scales.dtype.is_floating_point():
            raise ModelError(f"{where}: B or its float scales are missing")
        if zp is not None and zp.dtype != ir.DataType.UINT8:
            raise ModelError(f"{where}: float zero points (HQQ) cannot be written; only packed uint8 zero points")
        scheme = f"int{bits} block {bs} {'symmetric' if zp is None else 'asymmetric'}"
        inputs = (_B, _SCALES) if zp is None else (_B, _SCALES, _ZP)
        return InputWeight(inputs, (n, k), str(scales.dtype.numpy()), scheme)

    def quantize_input_weight(self, node: ir.Node, canonical: np.ndarray) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """ORT's quantizer on ``canonical`` (N, K): B (N, n_blocks, blob), scales (N, n_blocks), packed zero points
        (N, bytes) when the node has them; and deq(B), the weight the op applies. K past the last full block
        is padded with zeros as ORT's quantizer pads it."""
        spec = self.input_weight(node)
        n, k = spec.shape
        bits, bs = _attr(node, "bits", 4), _attr(node, "block_size")
        w = np.asarray(canonical, np.float32)
        if w.shape != (n, k):
            raise ShapeError(f"MatMulNBits {node.name!r}: a weight of shape {w.shape} does not fit (N, K) = {(n, k)}")
        symmetric = _ZP not in spec.inputs
        codes, scales, zp = quantize_blockwise(w, k, bits, bs, symmetric, _input(node, _SCALES).dtype.numpy())
        n_blocks, blob = -(-k // bs), bs * bits // 8
        tensors = {_B: _pack(codes, bits, n_blocks * blob, 0).reshape(n, n_blocks, blob), _SCALES: scales}
        mid = 1 << (bits - 1)
        if not symmetric:
            tensors[_ZP] = _pack(zp, bits, -(-n_blocks * bits // 8), mid)
        zp_all = zp if zp is not None else np.full((n, n_blocks), mid, np.uint8)
        return tensors, dequantize_blockwise(codes, scales, zp_all, k, bs)

    # -- inject ----------------------------------------------------------------------------------

    def add_branch(self, graph, node, a_value, b_value, dora_scale_value=None) -> None:
        from lora_export.graph.ops.branches import _finish, _prefix

        self._checked(node)
        prefix = _prefix(graph, node, a_value)
        x = node.inputs[_A]
        h = ir.node("MatMul", [x, a_value], name=f"{prefix}/lora_A")
        d = ir.node("MatMul", [h.outputs[0], b_value], name=f"{prefix}/lora_B")
        bias = None
        if dora_scale_value is not None and _input(node, _BIAS) is not None:
            # DoRA scales op(x) without its bias: the bias moves after g's Mul.
            bias = node.inputs[_BIAS]
            node.replace_input_with(_BIAS, None)
        _finish(graph, node, node.outputs[0], d.outputs[0], [h, d], dora_scale_value, bias, None, prefix)


def requantization_report(scheme: str, w: np.ndarray, old: np.ndarray, new: np.ndarray) -> dict:
    """What requantizing cost: ``w`` = deq(old) + ΔW asked for, deq(new) stored."""
    delta = w.astype(np.float64) - old
    err = new.astype(np.float64) - w
    w_norm, d_norm = float(np.linalg.norm(w)), float(np.linalg.norm(delta))
    report = {
        "scheme": scheme,
        "max_abs_error": float(np.abs(err).max()) if err.size else 0.0,
        "rel_frobenius_error": float(np.linalg.norm(err) / w_norm) if w_norm else 0.0,
        "delta_kept": float(np.linalg.norm(new.astype(np.float64) - old) / d_norm) if d_norm else 1.0,
        # The direction matters too: how far the change that landed is from ΔW, relative to ΔW.
        "delta_error": float(np.linalg.norm(new.astype(np.float64) - old - delta) / d_norm) if d_norm else 0.0,
    }
    report["summary"] = (
        f"requantized {scheme}: max abs error {report['max_abs_error']:.3g}, relative Frobenius error "
        f"{report['rel_frobenius_error']:.3g}, ‖deq(new) − deq(old)‖/‖ΔW‖ {report['delta_kept']:.3g}, "
        f"‖deq(new) − deq(old) − ΔW‖/‖ΔW‖ {report['delta_error']:.3g}"
    )
    return report


LAYOUT = MatMulNBitsLayout()


def register() -> None:
    """Entry point (``lora_export.op_layouts``): register the MatMulNBits layout (idempotent)."""
    register_layout(LAYOUT, replace=True)

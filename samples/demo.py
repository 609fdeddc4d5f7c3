"""End-to-end demo: train LoRA in PyTorch → export the base to ONNX → merge → inject → swap adapters.

1. Training: a tiny LLaMA built from a config (random weights, fixed seed, no downloads) learns a
   synthetic task — continue a sequence by adding k to every token, mod the vocabulary — through LoRA on
   the attention projections only (q_proj, v_proj). Two adapters: k=3 and k=5, saved in PEFT's format.
   The trained adapters are cached under ``samples/out/adapters/`` (keyed by a hash of the training
   set-up): a second run reuses them instead of retraining.
2. Merge: the base is exported once (``lora-export export``); an adapter is folded into its initializers
   (``lora-export merge``); ``lora-export verify`` checks the merged model against PyTorch's outputs.
3. Inject: the base graph gets LoRA slots (``lora-export inject``); both adapters stay resident in one
   session, switched per call, each checked against its PyTorch model.

The ONNX steps run the command line (``python -m lora_export ...``), as a pipeline would.
Run: ``make demo`` or ``python samples/demo.py``.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_export import (  # noqa: E402
    LoraConfig,
    LoraExportError,
    LoraSession,
    attach_lora,
    load_adapter,
    lora_summary,
    merge_file,
    save_adapter,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).resolve().parent
OUT_DIR = SAMPLES / "out"
CACHE_DIR = OUT_DIR / "adapters"
CACHE_STAMP = "demo-cache.json"
VOCAB = 32
SEQ = 12
SHIFT = 3
STEPS = 300
LOG_EVERY = 50
LR = 1e-2
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
# verify's gate for ONNX Runtime vs PyTorch (float32, different kernels): |a - b| <= atol + rtol * |b|.
RTOL, ATOL = 1e-4, 1e-4


def build_base_model(seed: int = 0) -> torch.nn.Module:
    """A small LlamaForCausalLM standing in for a pretrained base model (eval mode, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        # Larger than the default 0.02 so the frozen head can express confident predictions.
        initializer_range=0.2,
        attn_implementation="eager",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


def make_batch(gen: torch.Generator, batch: int = 32, shift: int = SHIFT) -> dict[str, torch.Tensor]:
    """Sequences where each token is the previous one plus ``shift`` (mod VOCAB), from a random start."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=gen)
    ids = (start + shift * torch.arange(SEQ)) % VOCAB
    return {"input_ids": ids, "labels": ids}


def train_demo(
    out_dir: str | Path = OUT_DIR,
    name: str = "adapter",
    shift: int = SHIFT,
    label: str | None = None,
    show_path: bool = True,
) -> tuple[torch.nn.Module, Path, dict[str, torch.Tensor]]:
    """Train LoRA on q_proj/v_proj, save the adapter to ``out_dir/<name>``, check that it reloads.

    Returns the trained (LoRA-wrapped, eval-mode) model, the adapter directory and example inputs.
    ``show_path=False``: the caller moves the adapter and says where it ends up.
    """
    out_dir = Path(out_dir)
    print(f"\n== train {label or name!r}: continue a sequence by +{shift}")
    base = build_base_model()
    model = copy.deepcopy(base)
    config = LoraConfig(**LORA)
    attach_lora(model, config)

    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, STEPS + 1):
        loss = model(**make_batch(gen, shift=shift)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % LOG_EVERY == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    print(f"trained {STEPS} steps in {time.perf_counter() - t0:.1f}s; {lora_summary(model)['lora_layers']} LoRA layers")

    example = example_inputs(shift)
    with torch.no_grad():
        base_acc = _accuracy(base, example["input_ids"])
        tuned_acc = _accuracy(model, example["input_ids"])
    print(f"next-token accuracy: base {base_acc:.0%} -> with LoRA {tuned_acc:.0%}")

    adapter_dir = save_adapter(model, out_dir / name, base_model_name_or_path="tiny-llama (random, seed 0)")
    if show_path:
        print(f"saved adapter to {adapter_dir}")
    check_reload(base, model, adapter_dir, example)
    return model, adapter_dir, example


def example_inputs(shift: int = SHIFT) -> dict[str, torch.Tensor]:
    return {"input_ids": make_batch(torch.Generator().manual_seed(1), batch=4, shift=shift)["input_ids"]}


def export_factory() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """For ``lora-export export demo:export_factory``: the base model and an example input."""
    return build_base_model(), example_inputs()


# -- the adapter cache --------------------------------------------------------------------------


def training_key(name: str, shift: int) -> str:
    """A hash of everything that determines a trained adapter (change any of it and the demo retrains)."""
    spec = {
        "name": name,
        "shift": shift,
        "vocab": VOCAB,
        "seq": SEQ,
        "steps": STEPS,
        "lr": LR,
        "lora": LORA,
        "base_seed": 0,
        "data_seed": 0,
        "torch": torch.__version__,
        # The code that builds the base, makes the data and trains: editing it invalidates the cache too.
        "code": hashlib.sha256(
            "".join(inspect.getsource(f) for f in (build_base_model, make_batch, train_demo)).encode()
        ).hexdigest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _export_key() -> str:
    import lora_export as package

    code = "".join(inspect.getsource(f) for f in (build_base_model, export_factory))
    spec = [code, torch.__version__, package.__version__, "dynamo"]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def trained_adapter(name: str, shift: int) -> tuple[torch.nn.Module, Path, dict[str, torch.Tensor]]:
    """The adapter from the cache when a valid one is there, else trained now and cached."""
    key = training_key(name, shift)
    cached = CACHE_DIR / f"{name}-{key}"
    model = _load_cached(cached, key)
    if model is not None:
        print(f"\n== reuse the trained adapter {name!r} from {cached.relative_to(OUT_DIR.parent)} (no retraining)")
        return model, cached, example_inputs(shift)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CACHE_DIR / f".{name}-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model, _, example = train_demo(tmp.parent, name=tmp.name, shift=shift, label=name, show_path=False)
    (tmp / CACHE_STAMP).write_text(json.dumps({"key": key, "name": name, "shift": shift}) + "\n")
    # Published whole (a rename) and only after the reload check passed: a half-written cache is never used.
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(tmp, cached)
    for old in CACHE_DIR.glob(f"{name}-*"):
        if old != cached:
            shutil.rmtree(old, ignore_errors=True)  # adapters of an older training set-up
    # Said only now: the folder it was trained into was a temporary name.
    print(f"saved adapter {name!r} to {cached}")
    return model, cached, example


def _load_cached(directory: Path, key: str) -> torch.nn.Module | None:
    """The LoRA model rebuilt from a cached adapter (base from its seed + the saved adapter), or None."""
    try:
        stamp = json.loads((directory / CACHE_STAMP).read_text())
        if stamp.get("key") != key:
            return None
        adapter = load_adapter(directory)
    except (OSError, ValueError, LoraExportError):
        return None
    return attach_lora(build_base_model(), adapter, verbose=False).eval()


def _accuracy(model: torch.nn.Module, ids: torch.Tensor) -> float:
    pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
    return (pred == ids[:, 1:]).float().mean().item()


def check_reload(base: torch.nn.Module, trained: torch.nn.Module, adapter_dir: Path, example: dict) -> None:
    """Attach the saved adapter to a fresh copy of the base model; its outputs must equal the trained model's."""
    reloaded = attach_lora(copy.deepcopy(base), load_adapter(adapter_dir), verbose=False).eval()
    with torch.no_grad():
        want = trained(**example).logits
        got = reloaded(**example).logits
    err = (got - want).abs().max().item()
    if err > 1e-5 * want.abs().max().item():
        raise SystemExit(f"reloaded adapter differs from the trained model: max abs error {err:.3g}")
    print(f"reloaded adapter matches the trained model (max abs error {err:.1e})")


# -- deployment on ONNX, through the command line ------------------------------------------------


def lora_export(*args: object, json_out: bool = False, cwd: Path = ROOT) -> dict | None:
    """Run ``python -m lora_export ARGS`` (this checkout's package); stop the demo if it fails."""
    cmd = [sys.executable, "-m", "lora_export", *map(str, args)] + (["--json"] if json_out else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    shown = " ".join(["lora-export", *(_short(a) for a in args)])
    print(f"$ {shown}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if not json_out and proc.stdout.strip():
        print("\n".join(f"  {line}" for line in proc.stdout.rstrip().splitlines()))
    if proc.returncode != 0:
        raise SystemExit(f"lora-export {args[0]} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout) if json_out else None


def _short(arg: object) -> str:
    text = str(arg)
    for root in (str(OUT_DIR.parent) + os.sep, str(ROOT) + os.sep):
        text = text.replace(root, "")
    return text


def _ort_logits(session, ids: torch.Tensor, adapter: str | None = None) -> np.ndarray:
    feeds = {"input_ids": ids.numpy()}
    if isinstance(session, LoraSession):
        return session.run(None, feeds, adapter=adapter)[0]
    return session.run(None, feeds)[0]


def _rel_err(got: np.ndarray, want: torch.Tensor) -> float:
    """Max abs error over max |logit|: one figure for the whole output. verify's max_rel is another one,
    the largest elementwise |a - b| / |b|, which near-zero logits inflate."""
    want = want.numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


ERROR_LABEL = "max |error| / max |logit|"


def export_and_merge(model: torch.nn.Module, adapter_dir: Path, example: dict, out_dir: Path) -> Path:
    """Export the base once, fold the adapter into its initializers, verify it against PyTorch."""
    print("\n== export the base model and merge the adapter into it")
    base_onnx = out_dir / "base.onnx"
    t0 = time.perf_counter()
    # The factory builds the same base (seeded) that the adapters were trained on; like the adapters, the
    # export is reused while nothing that determines it changed.
    stamp = out_dir / "base.onnx.key"
    key = _export_key()
    if base_onnx.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        print(f"reuse {base_onnx.name}: same base model, exporter and lora-export version (no re-export)")
    else:
        stamp.unlink(missing_ok=True)
        lora_export("export", "demo:export_factory", base_onnx, cwd=SAMPLES)
        stamp.write_text(key + "\n")
        print(f"exported {base_onnx.name} in {time.perf_counter() - t0:.1f}s")
    merged = out_dir / "merged-plus3.onnx"
    report = lora_export("merge", base_onnx, adapter_dir, "-o", merged, json_out=True)
    counts = report["counts"]
    print(
        f"merged {counts['merged_weights']} weights into {merged.name} in {report['timings_s'].get('total', 0):.2f}s "
        "(same nodes as the base: zero added latency)"
    )
    # PyTorch's logits (the LoRA model) are the reference that verify checks the merged model against.
    first_output = ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"]).get_outputs()[0].name
    ref = out_dir / "reference-plus3"
    ref.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        want = model(**example).logits
    np.save(ref / "logits.npy", want.numpy())
    np.savez(ref / "inputs.npz", input_ids=example["input_ids"].numpy())
    lora_export(
        "verify", merged, "--reference", ref / "logits.npy", "--inputs", ref / "inputs.npz",
        "--output", first_output, "--rtol", RTOL, "--atol", ATOL,
    )  # fmt: skip
    sess = ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"])
    err = _rel_err(_ort_logits(sess, example["input_ids"]), want)
    print(
        f"merged ONNX vs PyTorch LoRA model: {ERROR_LABEL} = {err:.1e} "
        "(verify's max_rel above is elementwise, |a - b| / |b|)"
    )
    return base_onnx


def inject_and_swap(base_onnx: Path, adapters: dict[str, tuple[torch.nn.Module, Path, dict]], out_dir: Path) -> None:
    """One base graph with LoRA slots; both adapters resident in one session, switched per call."""
    print("\n== inject LoRA slots; serve both adapters from one session")
    served = out_dir / "served"
    # NAME=PATH: the files are named plus3.* and plus5.*, whatever the cache folders are called.
    lora_export("inject", base_onnx, *(f"{name}={a[1]}" for name, a in adapters.items()), "-o", served)
    sess = LoraSession(served / "model.onnx")
    for name in adapters:
        sess.load_adapter(name, served / f"{name}.onnx_adapter")
    for name, (model, _, example) in adapters.items():
        ids = example["input_ids"]
        with torch.no_grad():
            want = model(input_ids=ids).logits
        got = _ort_logits(sess, ids, name)
        if not np.allclose(got, want.numpy(), rtol=RTOL, atol=ATOL):
            raise SystemExit(f"adapter {name!r}: the injected model differs from PyTorch beyond rtol/atol")
        print(
            f"adapter {name!r} in the session vs its PyTorch model: {ERROR_LABEL} = "
            f"{_rel_err(got, want):.1e}; next-token accuracy {_accuracy_np(got, ids):.0%}"
        )
    names = list(adapters)
    ids = adapters[names[0]][2]["input_ids"]
    same, switched = [], []
    for i in range(40):
        t0 = time.perf_counter()
        _ort_logits(sess, ids, names[0])
        same.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _ort_logits(sess, ids, names[i % 2])
        switched.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    merge_file(base_onnx, adapters[names[1]][1], out_dir / "rebuild.onnx")
    ort.InferenceSession(str(out_dir / "rebuild.onnx"), providers=["CPUExecutionProvider"])
    rebuild = time.perf_counter() - t0
    print(
        f"per-call latency: same adapter {np.median(same) * 1e3:.2f} ms, alternating adapters "
        f"{np.median(switched) * 1e3:.2f} ms (a switch is a binding); merge + new session instead "
        f"(in process): {rebuild * 1e3:.0f} ms"
    )


def _accuracy_np(logits: np.ndarray, ids: torch.Tensor) -> float:
    return float((logits[:, :-1].argmax(-1) == ids[:, 1:].numpy()).mean())


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model3, adapter3, example = trained_adapter("plus3", shift=3)
    model5, adapter5, example5 = trained_adapter("plus5", shift=5)
    base_onnx = export_and_merge(model3, adapter3, example, OUT_DIR)
    adapters = {"plus3": (model3, adapter3, example), "plus5": (model5, adapter5, example5)}
    inject_and_swap(base_onnx, adapters, OUT_DIR)
    print(f"\ndemo done in {time.perf_counter() - t0:.1f}s (wall time); files in {OUT_DIR}")


if __name__ == "__main__":
    main()

"""Artifacts for benchmarks/genai_llama.py, built once into a work folder and reused (each step skips itself
when its output exists).

  hf/            a random-init LlamaForCausalLM (fixed seed) + a tokenizer trained offline
  adapter/       a rank-8 PEFT adapter on q_proj/v_proj with random nonzero A and B
  genai-<p>/     the onnxruntime-genai builder's base model (<p> = fp32 | int4; CPU EP)
  baked-<p>/     the builder with ``--extra_options adapter_path=adapter``: LoRA A/B as constant MatMuls
  olive-<p>/     Olive's ExtractAdapters on baked-<p>: LoRA A/B as graph inputs + an .onnx_adapter
  inject-<p>/    ``lora-export inject`` of genai-<p> (slots + qv.onnx_adapter)
  merged-<p>/    ``lora-export merge`` of genai-<p> (int4: ``--requantize``)

The builder and Olive run in their own virtual environments (different transformers/onnxruntime pins);
our CLI runs as ``python -m lora_export`` with this checkout first on the path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENAI_PY = Path(os.environ.get("GENAI_PY", "/work/realx/venv-genai/bin/python"))
OLIVE_PY = Path(os.environ.get("OLIVE_PY", "/work/realx/venv-olive/bin/python"))
# >= 150M parameters: 2 x 24.6M (untied embedding and lm_head) + 12 x 8.65M
CONFIG = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
RANK, ALPHA, TARGETS = 8, 16, ["q_proj", "v_proj"]
ADAPTER_NAME = "qv"


def _run(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> tuple[int, float]:
    """Run ``cmd`` with stdout+stderr into ``log``; returns (exit code, wall seconds incl. interpreter start)."""
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False)
    return proc.returncode, time.perf_counter() - t


def last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip()[:400] if lines else ""


def build_hf(work: Path) -> dict:
    """HF folder (random init, seed 0) with an offline tokenizer, and the PEFT adapter (seed 1)."""
    hf, adapter = work / "hf", work / "adapter"
    if not (hf / "model.safetensors").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
        model.save_pretrained(hf, safe_serialization=True)
        _tokenizer(hf)
    if not (adapter / "adapter_model.safetensors").exists():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
        pm = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:  # PEFT zero-inits B: random B so the adapter changes the output
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        pm.save_pretrained(adapter)
    from safetensors import safe_open

    with safe_open(str(hf / "model.safetensors"), "np") as f:
        params = sum(int(__import__("numpy").prod(f.get_slice(k).get_shape())) for k in f.keys())
    return {"parameters": params, "hf": str(hf), "adapter": str(adapter)}


def _tokenizer(path: Path) -> None:
    """A small BPE tokenizer trained offline: the builder and the genai runtime want tokenizer files."""
    import random

    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(600)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tr = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator([" ".join(words[i : i + 10]) for i in range(0, 600, 10)], tr)
    T.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(path)


def tag(precision: str, ep: str) -> str:
    """Folder suffix: the builder makes different graphs per execution provider."""
    return precision if ep == "cpu" else f"{precision}-{ep}"


def build_genai(work: Path, precision: str, baked: bool, ep: str = "cpu") -> dict:
    """The genai builder's model for execution provider ``ep``, plain or with the adapter baked in."""
    out = work / f"{'baked' if baked else 'genai'}-{tag(precision, ep)}"
    log = work / f"{out.name}.log"
    if (out / "model.onnx").exists():
        return {"path": str(out / "model.onnx"), "cached": True}
    cmd = [str(GENAI_PY), "-m", "onnxruntime_genai.models.builder", "-i", str(work / "hf"), "-o", str(out)]
    cmd += ["-p", precision, "-e", ep, "-c", str(work / "genai-cache")]
    if baked:
        cmd += ["--extra_options", f"adapter_path={work / 'adapter'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    rc, secs = _run(cmd, log, env=env)
    if rc != 0 or not (out / "model.onnx").exists():
        shutil.rmtree(out, ignore_errors=True)
        return {"error": f"builder exit {rc}: {last_line(log)}", "log": str(log)}
    return {"path": str(out / "model.onnx"), "build_s": round(secs, 1)}


OLIVE_SCRIPT = r"""
import json, sys
from pathlib import Path
from olive.model import ONNXModelHandler
from olive.passes.olive_pass import create_pass_from_dict
from olive.passes.onnx.extract_adapters import ExtractAdapters
src, out = Path(sys.argv[1]), Path(sys.argv[2])
model = ONNXModelHandler(model_path=str(src.parent), onnx_file_name=src.name)
p = create_pass_from_dict(ExtractAdapters, {"make_inputs": True, "dynamic_lora_r": True,
                                            "save_format": "onnx_adapter"}, disable_search=True)
res = p.run(model, str(out))
attrs = {k: str(v) for k, v in (res.model_attributes or {}).items()}
print(json.dumps({"model": str(res.model_path), "attributes": attrs}))
"""


def build_olive(work: Path, precision: str, ep: str = "cpu") -> dict:
    """Olive's ExtractAdapters pass on the builder's baked model (what ``olive auto-opt --adapter_path`` runs
    after the model builder): LoRA weights become inputs, the adapter an .onnx_adapter file."""
    out = work / f"olive-{tag(precision, ep)}"
    log = work / f"{out.name}.log"
    done = out / "olive.json"
    if done.exists():
        return json.loads(done.read_text())
    src = work / f"baked-{tag(precision, ep)}" / "model.onnx"
    if not OLIVE_PY.exists():
        return {"error": f"no Olive environment at {OLIVE_PY}"}
    if not src.exists():
        return {"error": f"no baked model {src}"}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    rc, secs = _run([str(OLIVE_PY), "-c", OLIVE_SCRIPT, str(src), str(out / "model")], log, env=env, cwd=out)
    if rc != 0:
        return {"error": f"Olive exit {rc}: {last_line(log)}", "log": str(log)}
    models = sorted(out.rglob("*.onnx"))
    adapters = sorted(out.rglob("*.onnx_adapter"))
    if not models or not adapters:
        return {"error": f"Olive wrote no model/adapter: {[str(p) for p in out.rglob('*')]}", "log": str(log)}
    genai_files(src.parent, models[0].parent)
    info = {"path": str(models[0]), "adapter": str(adapters[0]), "build_s": round(secs, 1)}
    done.write_text(json.dumps(info))
    return info


def genai_files(src: Path, dst: Path) -> None:
    """The genai runtime needs genai_config.json (and the tokenizer) beside a model: copy the builder's, which
    names the same inputs and outputs (LoRA inputs have defaults or come from og.Adapters)."""
    for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def cli_env() -> dict:
    return dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'plugins'}")


def run_cli(work: Path, args: list[str], log: Path) -> dict:
    """``python -m lora_export ARGS --json``: exit code, wall time (interpreter start included), report."""
    rc, secs = _run([sys.executable, "-m", "lora_export", *args, "--json"], log, env=cli_env(), cwd=work)
    text = log.read_text(errors="replace")
    report = None
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                report = json.loads(line)
            except ValueError:
                pass
            break
    if report is None:
        try:
            report = json.loads(text[text.index("{") :])
        except ValueError:
            report = None
    return {"rc": rc, "wall_s": round(secs, 3), "report": report, "last_line": last_line(log)}


def build_ours(work: Path, precision: str, runs: int, ep: str = "cpu") -> dict:
    """inject and merge with the CLI (merge timed ``runs`` times; int4 merge with --requantize). Rebuilt on
    every run: the CLI is what is measured, and it may have changed since the last run."""
    t = tag(precision, ep)
    base = work / f"genai-{t}" / "model.onnx"
    weights = work / "hf" / "model.safetensors"
    out: dict = {}
    inj = work / f"inject-{t}"
    args = ["inject", str(base), f"{ADAPTER_NAME}={work / 'adapter'}", "-o", str(inj), "--base-weights", str(weights)]
    r = run_cli(work, args, work / f"inject-{t}.log")
    out["inject"] = _outcome(r, inj / "model.onnx")
    if r["rc"] == 0:
        out["inject"]["adapter"] = str(inj / f"{ADAPTER_NAME}.onnx_adapter")
        genai_files(base.parent, inj)
    merged = work / f"merged-{t}"
    merged.mkdir(exist_ok=True)
    args = ["merge", str(base), str(work / "adapter"), "-o", str(merged / "model.onnx"), "--base-weights", str(weights)]
    if precision == "int4":
        args.append("--requantize")
    walls = []
    for _ in range(max(1, runs)):
        for f in merged.glob("model.onnx*"):
            f.unlink()  # a fresh output each run (merge refuses nothing here, but keep runs alike)
        r = run_cli(work, args, work / f"merge-{t}.log")
        if r["rc"] != 0:
            break
        walls.append(r["wall_s"])
    out["merge"] = _outcome(r, merged / "model.onnx")
    if r["rc"] == 0:
        genai_files(base.parent, merged)
    if walls:
        out["merge"]["cli_wall_s"] = walls
        out["merge"]["timings_s"] = (r["report"] or {}).get("timings_s")
        out["merge"]["requantization"] = _requant(r["report"])
    return out


def _outcome(r: dict, path: Path) -> dict:
    if r["rc"] == 0:
        return {"path": str(path), "wall_s": r["wall_s"]}
    line = (r["report"] or {}).get("error") or r["last_line"]
    return {"refused": f"exit {r['rc']}: {line}"}


def _requant(report: dict | None) -> dict | None:
    """Per-target write errors of a lossy (requantizing) merge, summarized."""
    writes = [m.get("write") for m in (report or {}).get("merged", []) if isinstance(m.get("write"), dict)]
    if not writes:
        return None
    keys = sorted({k for w in writes for k, v in w.items() if isinstance(v, (int, float))})
    summary = {}
    for k in keys:
        vals = [float(w[k]) for w in writes if isinstance(w.get(k), (int, float))]
        summary[k] = {"min": min(vals), "median": sorted(vals)[len(vals) // 2], "max": max(vals)}
    return {"targets": len(writes), "summary": summary}


def genai_version() -> str | None:
    return _venv_version(GENAI_PY, "onnxruntime-genai")


def olive_version() -> str | None:
    return _venv_version(OLIVE_PY, "olive-ai")


def _venv_version(python: Path, dist: str) -> str | None:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def git_commit() -> str | None:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "lora_export", "plugins"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return (proc.stdout.strip() + ("+dirty" if dirty else "")) if proc.returncode == 0 else None

"""Benchmark ``lora-export build``: a first build, an unchanged rebuild (up to date, from the cache) and a
rebuild after one adapter changed, on a LLaMA-architecture model (random init, fp32, external data) with
two PEFT adapters, artifacts merged/a1, merged/a2 and injected (a1, a2).

Each figure: CLI wall time (a fresh ``python -m lora_export build`` process, interpreter start included)
and the in-process time of ``build()``; medians of --runs runs, each with a fresh DIST and cache.

Usage: python benchmarks/build_cache.py [--runs 3] [--hidden 512] [--layers 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_details, print_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = """\
[base]
model = "base/model.onnx"
[adapters]
a1 = "a1"
a2 = "a2"
[[artifact]]
kind = "merged"
adapters = ["a1", "a2"]
[[artifact]]
kind = "injected"
adapters = ["a1", "a2"]
[verify]
inputs = "inputs.npz"
references = { a1 = "ref_a1.npz", a2 = "ref_a2.npz" }
tolerance = 1e-4
rtol = 1e-3
"""


def _adapter(base, path: Path, seed: int, ids):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = get_peft_model(
        __import__("copy").deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
    shutil.rmtree(path, ignore_errors=True)
    m.save_pretrained(str(path))
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()


class _Logits(__import__("torch").nn.Module):
    """Keyword inputs in, logits out: the exported graph takes exactly input_ids and attention_mask."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def setup(root: Path, hidden: int, layers: int) -> None:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128, use_cache=False,
                      attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    (root / "base").mkdir(parents=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(base), (ids, torch.ones_like(ids)), str(root / "tmp.onnx"), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"])  # fmt: skip
    import onnx

    onnx.save(onnx.load(str(root / "tmp.onnx")), str(root / "base" / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)  # fmt: skip
    os.unlink(root / "tmp.onnx")
    np.savez(root / "inputs.npz", input_ids=ids.numpy(), attention_mask=np.ones_like(ids.numpy()))
    for name, seed in (("a1", 1), ("a2", 2)):
        np.savez(root / f"ref_{name}.npz", logits=_adapter(base, root / name, seed, ids))
    (root / "recipe.toml").write_text(RECIPE)
    torch.save({"base": base.state_dict(), "cfg": cfg.to_dict()}, root / "base.pt")


def change_a2(root: Path) -> None:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    saved = torch.load(root / "base.pt")
    base = LlamaForCausalLM(LlamaConfig(**saved["cfg"])).eval()
    base.load_state_dict(saved["base"])
    ids = torch.from_numpy(np.load(root / "inputs.npz")["input_ids"])
    np.savez(root / "ref_a2.npz", logits=_adapter(base, root / "a2", 7, ids))


def cli(root: Path, dist: Path, cache: Path) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lora_export", "build", str(root / "recipe.toml"), "-o", str(dist),
                    "--cache", str(cache)], capture_output=True, text=True, env=env)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return time.perf_counter() - t0


def in_process(root: Path, dist: Path, cache: Path) -> float:
    from lora_export.build.runner import build

    t0 = time.perf_counter()
    build(root / "recipe.toml", dist, cache_dir=cache)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    figures: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            root = Path(tmp) / f"r{run}"
            setup(root, args.hidden, args.layers)
            for how, fn in (("cli", cli), ("in-process", in_process)):
                dist, cache = root / f"dist-{how}", root / f"cache-{how}"
                shutil.copytree(root / "a2", root / "a2.orig")
                shutil.copyfile(root / "ref_a2.npz", root / "ref_a2.orig")
                f = figures.setdefault(how, {})
                f.setdefault("first build", []).append(fn(root, dist, cache))
                f.setdefault("unchanged (up to date)", []).append(fn(root, dist, cache))
                change_a2(root)
                f.setdefault("a2 changed", []).append(fn(root, dist, cache))
                shutil.rmtree(root / "a2")
                os.rename(root / "a2.orig", root / "a2")
                os.replace(root / "ref_a2.orig", root / "ref_a2.npz")
            size = sum(p.stat().st_size for p in (root / "base").iterdir())
    med = {how: {k: statistics.median(v) for k, v in f.items()} for how, f in figures.items()}
    rows = []
    for case in med["cli"]:
        first_cli, first_in = med["cli"]["first build"], med["in-process"]["first build"]
        rows.append([case, f"{med['cli'][case]:.2f}", f"{med['cli'][case] / first_cli:.2f}",
                     f"{med['in-process'][case]:.2f}", f"{med['in-process'][case] / first_in:.2f}"])  # fmt: skip
    print(f"model: hidden {args.hidden}, {args.layers} layers, {size / 1e6:.0f} MB; median of {args.runs} runs")
    print_table(["build", "CLI wall s", "x first", "in-process s", "x first"], rows)
    path = write_results("build", {"machine": machine_details(), "args": vars(args), "model_bytes": size,
                                   "runs": figures, "medians": med})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

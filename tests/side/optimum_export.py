"""Export tiny random-init BART and T5 (tests/test_optimum_multi_file.py) and a decoder-only LLaMA with its
KV cache (tests/test_per_row_optimum.py) with Optimum (``optimum-onnx``).

Run in the side venv ``.venv-optimum`` (Optimum pins transformers < 4.58), through ``make optimum-graphs``.
Writes, per model, ``OUT/<name>/hf`` (``save_pretrained``: the weights PEFT is applied to in the main venv)
and ``OUT/<name>/onnx`` (Optimum's export folder), then ``OUT/<name>/COMPLETE`` last, so an interrupted
run is redone. No hub access: the models come from small configs with a fixed seed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

NAMES = ("bart", "t5", "llama")
TASKS = {"bart": "text2text-generation-with-past", "t5": "text2text-generation-with-past"}
TASKS["llama"] = "text-generation-with-past"  # one model.onnx with past inputs (or a merged decoder)


def _configs() -> dict:
    from transformers import BartConfig, LlamaConfig, T5Config

    return {
        "bart": BartConfig(
            vocab_size=96,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        "t5": T5Config(
            vocab_size=96,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        "llama": LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        ),
    }


def export_one(name: str, config, out: Path) -> None:
    """Build the model from ``config`` (seed 0), save it and export it with Optimum into ``out/name``."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    final = out / name
    work = out / f".{name}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if TASKS[name].startswith("text-generation") else AutoModelForSeq2SeqLM
    model = auto.from_config(config).eval()
    model.save_pretrained(work / "hf")
    main_export(
        str(work / "hf"),
        output=work / "onnx",
        task=TASKS[name],
        opset=18,
        device="cpu",
        do_validation=True,
    )
    import optimum.version
    import transformers

    info = {
        "transformers": transformers.__version__,
        "optimum": optimum.version.__version__,
        "torch": torch.__version__,
        "files": sorted(p.name for p in (work / "onnx").iterdir()),
    }
    (work / "COMPLETE").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    print(f"{name}: exported {info['files']} to {final}")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/.optimum-graphs")
    out.mkdir(parents=True, exist_ok=True)
    todo = [n for n in NAMES if not (out / n / "COMPLETE").is_file()]
    for name in NAMES:
        if name not in todo:
            print(f"{name}: up to date in {out / name}")
    if todo:  # transformers is imported only when there is something to export
        configs = _configs()
        for name in todo:
            export_one(name, configs[name], out)


if __name__ == "__main__":
    main()

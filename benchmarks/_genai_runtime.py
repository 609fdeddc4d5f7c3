"""Runs under the onnxruntime-genai environment (GENAI_PY), not the project's: token generation with the genai
runtime itself (og.Generator; adapters through og.Adapters + set_active_adapter), as onnxruntime-genai users
measure it. Argument: a JSON spec {threads, reps, new_tokens, vocab, variants: {key: {folder, adapter?}}}.
Prints one JSON line: per variant the prefill times (128-token prompt, batch 1) and per repetition the median
time of one generated token, the greedy tokens of the warm-up run, or the error that stopped the variant."""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import onnxruntime_genai as og

PROMPT = 128


def main() -> None:
    spec = json.loads(sys.argv[1])
    session = {"intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}
    models, errors, tokens = {}, {}, {}
    for key, v in spec["variants"].items():
        try:
            cfg = og.Config(v["folder"])
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
            model = og.Model(cfg)
            adapters = None
            if v.get("adapter"):
                adapters = og.Adapters(model)
                adapters.load(v["adapter"], "qv")
            models[key] = (model, adapters)
            tokens[key] = generate(models[key], spec)[2]  # warm-up
        except Exception as e:  # noqa: BLE001 - reported per variant
            errors[key] = str(e).splitlines()[0][:300]
            models.pop(key, None)
    keys = list(models)
    samples = {k: {"prefill": [], "token": []} for k in keys}
    for rep in range(spec["reps"]):
        for k in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
            prefill, token, _ = generate(models[k], spec)
            samples[k]["prefill"].append(prefill)
            samples[k]["token"].append(token)
    print(json.dumps({"samples": samples, "tokens": tokens, "errors": errors}))


def generate(loaded, spec) -> tuple[float, float, list[int]]:
    model, adapters = loaded
    ids = np.random.default_rng(101).integers(4, spec["vocab"], (1, PROMPT), dtype=np.int64)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=PROMPT + spec["new_tokens"], do_sample=False)
    gen = og.Generator(model, params)
    if adapters is not None:
        gen.set_active_adapter(adapters, "qv")
    t = time.perf_counter()
    gen.append_tokens(ids)
    prefill = time.perf_counter() - t
    steps = []
    while not gen.is_done():
        t = time.perf_counter()
        gen.generate_next_token()
        steps.append(time.perf_counter() - t)
    return prefill, statistics.median(steps), [int(x) for x in gen.get_sequence(0)[PROMPT:]]


if __name__ == "__main__":
    main()

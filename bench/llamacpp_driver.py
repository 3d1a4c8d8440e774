"""Runs inside llama-cpp-python's own virtual environment, driven by bench/generate_vs_llamacpp.py.

Reads one JSON command per line on stdin and answers one JSON line on stdout:

    {"cmd": "quantize", "source": path, "target": path, "type": "f32" | "f16" | "q8_0" | "q4_1"}
    {"cmd": "run", "model": path, "threads": n, "prompt": [ids], "new_tokens": n}
        -> {"ttft_ms", "decode_tok_s", "tokens"}: greedy decoding, the KV cache reset before the prompt
    {"cmd": "quit"}

Models stay loaded between runs (one at a time), so alternating runs measure decoding, not loading.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import llama_cpp

FTYPES = {"f32": 0, "f16": 1, "q4_1": 3, "q8_0": 7}
_loaded: dict[str, llama_cpp.Llama] = {}


def quantize(source: str, target: str, kind: str) -> dict:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.allow_requantize = True
    params.nthread = 2
    code = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize returned {code}")
    return {"ok": True}


def model(path: str, threads: int) -> llama_cpp.Llama:
    key = f"{path}:{threads}"
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = llama_cpp.Llama(
            model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False
        )
    return _loaded[key]


def run(path: str, threads: int, prompt: list[int], new_tokens: int) -> dict:
    llm = model(path, threads)
    llm.reset()
    start = time.perf_counter()
    times, tokens = [], []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter())
        tokens.append(int(token))
        if len(tokens) >= new_tokens:
            break
    ttft = (times[0] - start) * 1000
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"ttft_ms": ttft, "decode_tok_s": decode, "tokens": tokens}


def main() -> None:
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "quit":
                break
            if command["cmd"] == "quantize":
                answer = quantize(command["source"], command["target"], command["type"])
            else:
                answer = run(command["model"], command["threads"], command["prompt"], command["new_tokens"])
        except Exception as e:  # reported to the bench, which stops
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()

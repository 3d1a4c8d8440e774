"""Runs inside llama-cpp-python's own virtual environment, driven by bench/generate_vs_llamacpp.py.

Reads one JSON command per line on stdin and answers one JSON line on stdout:

    {"cmd": "quantize", "source": path, "target": path, "type": "f32" | "f16" | "q8_0" | "q4_1"}
    {"cmd": "run", "model": path, "threads": n, "prompt": [ids], "new_tokens": n, "extra_bufts": bool}
        -> {"ttft_ms", "decode_tok_s", "tokens"}: greedy decoding, the KV cache reset before the prompt
    {"cmd": "quit"}

Models stay loaded between runs (one at a time), so alternating runs measure decoding, not loading.
llama.cpp's logs go to stderr (verbose=False crashed llama-cpp-python 0.3.36 here at load). `extra_bufts`
false loads without llama.cpp's extra CPU buffer types (AMX, repacked weights): with them, a build for a
CPU with AMX segfaulted in llama_decode on Q8_0 weights on this virtual machine.
"""

from __future__ import annotations

import ctypes
import json
import os
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


def model(path: str, threads: int, extra_bufts: bool) -> llama_cpp.Llama:
    key = f"{path}:{threads}:{extra_bufts}"
    if key not in _loaded:
        _loaded.clear()
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def model_params():  # Llama() takes its model parameters from here and exposes no such option
            params = defaults()
            params.use_extra_bufts = extra_bufts
            return params

        llama_cpp.llama_cpp.llama_model_default_params = model_params
        try:
            _loaded[key] = llama_cpp.Llama(
                model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=True
            )
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = defaults
    return _loaded[key]


def run(path: str, threads: int, prompt: list[int], new_tokens: int, extra_bufts: bool) -> dict:
    llm = model(path, threads, extra_bufts)
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
    # llama.cpp logs to the C stdout: answers go to a copy of it, everything else to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "quit":
                break
            if command["cmd"] == "quantize":
                answer = quantize(command["source"], command["target"], command["type"])
            else:
                answer = run(
                    command["model"],
                    command["threads"],
                    command["prompt"],
                    command["new_tokens"],
                    command.get("extra_bufts", False),
                )
        except Exception as e:  # reported to the bench, which stops
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    main()

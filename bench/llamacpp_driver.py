"""Runs inside llama-cpp-python's own virtual environment, driven by bench/generate_vs_llamacpp.py.

Reads one JSON command per line on stdin and answers one JSON line on stdout:

    {"cmd": "quantize", "source": path, "target": path, "type": one of FTYPES}
    {"cmd": "convert", "source": hf_dir, "target": path}: a float32 GGUF of a LLaMA in safetensors
        (bench/decode_parity.py's random 1.1B model), written with the `gguf` package
    {"cmd": "run", "model": path, "threads": n, "prompt": [ids], "new_tokens": n, "extra_bufts": bool}
        -> {"ttft_ms", "decode_tok_s", "tokens"}: greedy decoding, the KV cache reset before the prompt
    {"cmd": "batch", "model": path, "threads": n, "prompts": [[ids], ...], "new_tokens": n}
        -> {"decode_tok_s", "tokens"}: greedy decoding of every prompt together (one sequence each, one
        llama_decode per step for all of them); decode_tok_s counts the tokens of all sequences
    {"cmd": "ppl", "model": path, "threads": n, "windows": [[ids], ...]}
        -> {"nll", "tokens"}: the summed negative log-likelihood of tokens 2..n of every window given the
        ones before it, from llama.cpp's logits of every position (logits_all), and how many were scored
    {"cmd": "rss"} -> {"peak_rss_mb"}: this process's peak resident memory (VmHWM)
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
import numpy as np
from peak_rss import peak_rss_mb  # bench/peak_rss.py: this script's folder is first on sys.path

FTYPES = {  # llama.cpp's file types by the bench's names
    "f32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q3_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
}
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


def model(
    path: str, threads: int, extra_bufts: bool, sequences: int = 1, logits_all: bool = False
) -> llama_cpp.Llama:
    """The model at `path`, loaded once (one at a time); `sequences` > 1: a context for that many sequences
    of up to 1024 positions each."""
    key = f"{path}:{threads}:{extra_bufts}:{sequences}:{logits_all}"
    if key not in _loaded:
        _loaded.clear()
        model_defaults = llama_cpp.llama_cpp.llama_model_default_params
        context_defaults = llama_cpp.llama_cpp.llama_context_default_params

        def model_params():  # Llama() takes its model parameters from here and exposes no such option
            params = model_defaults()
            params.use_extra_bufts = extra_bufts
            return params

        def context_params():  # nor the number of sequences of its context
            params = context_defaults()
            params.n_seq_max = sequences
            return params

        llama_cpp.llama_cpp.llama_model_default_params = model_params
        llama_cpp.llama_cpp.llama_context_default_params = context_params
        try:
            _loaded[key] = llama_cpp.Llama(
                model_path=path,
                n_ctx=1024 * sequences,
                n_batch=1024,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=logits_all,
                verbose=True,
            )
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = model_defaults
            llama_cpp.llama_cpp.llama_context_default_params = context_defaults
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


def batch(path: str, threads: int, prompts: list[list[int]], new_tokens: int, extra_bufts: bool) -> dict:
    """Greedy decoding of every prompt at once: each prompt is prefilled as its own sequence, then every
    step decodes one token of each sequence in one llama_decode."""
    llm = model(path, threads, extra_bufts, sequences=len(prompts))
    ctx = llm.ctx
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    n_vocab = llm.n_vocab()
    size = max(max(len(p) for p in prompts), len(prompts))
    handle = llama_cpp.llama_batch_init(size, 0, len(prompts))

    def decode(entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decode (token, position, sequence, wants logits) entries; the greedy token of each wanting one."""
        for i, (token, position, sequence, logits) in enumerate(entries):
            handle.token[i], handle.pos[i], handle.n_seq_id[i] = token, position, 1
            handle.seq_id[i][0], handle.logits[i] = sequence, logits
        handle.n_tokens = len(entries)
        if llama_cpp.llama_decode(ctx, handle) != 0:
            raise RuntimeError("llama_decode failed")
        return [
            int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())
            for i, entry in enumerate(entries)
            if entry[3]
        ]

    try:
        last = []
        for sequence, prompt in enumerate(prompts):
            entries = [(t, p, sequence, p == len(prompt) - 1) for p, t in enumerate(prompt)]
            last += decode(entries)
        tokens = [[t] for t in last]
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            entries = [(row[-1], len(prompts[s]) + step, s, True) for s, row in enumerate(tokens)]
            for row, token in zip(tokens, decode(entries), strict=True):
                row.append(token)
        elapsed = time.perf_counter() - start
    finally:
        llama_cpp.llama_batch_free(handle)
    return {"decode_tok_s": len(prompts) * (new_tokens - 1) / elapsed, "tokens": tokens}


def perplexity(path: str, threads: int, windows: list[list[int]]) -> dict:
    """Summed NLL of every window's tokens after its first, from llama.cpp's logits at every position."""
    llm = model(path, threads, False, logits_all=True)
    nll, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = llm.scores[: len(window) - 1].astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        nll += float((log_z - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    return {"nll": nll, "tokens": count}


def convert(source: str, target: str) -> dict:
    """A float32 GGUF of the LLaMA in `source` (config.json, safetensors), tensor by tensor from a memory
    map. Q and K rows are permuted from Hugging Face's rotate-half layout to GGUF's interleaved one (as
    llama.cpp's own converter does); the vocabulary is a placeholder SentencePiece one (<unk>, <s>, </s>,
    the 256 byte tokens, then `w<i>`): the bench feeds token ids, never text."""
    import gguf
    from safetensors import safe_open

    config = json.loads(open(os.path.join(source, "config.json")).read())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    vocab, layers = config["vocab_size"], config["num_hidden_layers"]
    writer = gguf.GGUFWriter(target, "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [b"<unk>", b"<s>", b"</s>", *(f"<0x{i:02X}>".encode() for i in range(256))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [
        gguf.TokenType.BYTE
    ] * 256
    tokens += [f"w{i}".encode() for i in range(len(tokens), vocab)]
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    files = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))
    handles = [safe_open(os.path.join(source, f), "np") for f in files]
    order = [(handle, name) for handle in handles for name in handle.keys()]
    for handle, name in order:  # the tensor infos first, then the data one tensor at a time
        shape = handle.get_slice(name).get_shape()
        target_name = names.get_name(name, try_suffixes=(".weight",))
        writer.add_tensor_info(target_name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for handle, name in order:
        tensor = handle.get_tensor(name).astype(np.float32, copy=False)
        if name.endswith("q_proj.weight"):
            tensor = permute(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute(tensor, kv_heads)
        writer.write_tensor_data(np.ascontiguousarray(tensor))
    writer.close()
    return {"ok": True}


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
            elif command["cmd"] == "convert":
                answer = convert(command["source"], command["target"])
            elif command["cmd"] == "rss":
                answer = {"peak_rss_mb": peak_rss_mb()}
            elif command["cmd"] == "ppl":
                answer = perplexity(command["model"], command["threads"], command["windows"])
            elif command["cmd"] == "batch":
                answer = batch(
                    command["model"],
                    command["threads"],
                    command["prompts"],
                    command["new_tokens"],
                    command.get("extra_bufts", False),
                )
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

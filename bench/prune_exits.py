"""Exits of a saved pruned model: profiled (latency + per-exit quality) and served by the engine."""

import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.generation.engine import EarlyExitEngine, GenerationRequest, TokenEvent
from workers.generation.profiler import profile_model

t0 = time.time()
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
engine = EarlyExitEngine(model, tok, device="cpu")
prof = profile_model(
    engine,
    grid=[8, 16, 24],
    prompt_lengths=(16,),
    decode_tokens=4,
    repeats=1,
    max_quality_tokens=512,
    model_name="pruned",
)
for k, q in sorted(prof.quality.items()):
    print(f"exit {k}: ppl {q.perplexity:.2f} top1-agreement {q.top1_agreement:.3f} ({q.tokens} tokens)")
print("latency model fitted for", prof.num_layers, "layers", f"[{time.time() - t0:.0f}s]")
chat = tok.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=True
)
chat = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
for depth in (24, 16):
    req = GenerationRequest(prompt_ids=list(chat), depth=depth, max_new_tokens=16)
    ids = [e.token_id for e in engine.generate([req]) if isinstance(e, TokenEvent)]
    print(f"served at depth {depth}: {tok.decode(ids, skip_special_tokens=True)!r} [{time.time() - t0:.0f}s]")

"""Block replacement figures for docs/prune-grow.md: fit, held-out perplexity, README prompts (greedy)."""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from workers.eval.perplexity import perplexity
from workers.eval.texts import answer_windows, calibration_windows, heldout_text
from workers.prune.depth import drop_layers
from workers.prune.heal import heal
from workers.prune.replace import FitOptions, replace_block

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--criterion", default="kl")
p.add_argument("--data", default="answers")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--kl", type=float, default=0.0)
p.add_argument("--block-start", type=int, default=None)
p.add_argument("--heal-steps", type=int, default=0)
p.add_argument("--heal-data", default="calibration")
p.add_argument("--drop", default=None, help="plain removal of these layers instead of replacement")
p.add_argument("--save", default=None)
p.add_argument("--load", default=None, help="a pruned model saved by --save instead of pruning again")
a = p.parse_args()
t0 = time.time()
say = lambda *x: print(*x, f"[{time.time() - t0:.0f}s]", flush=True)  # noqa: E731
tok = AutoTokenizer.from_pretrained(a.model)
src = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
cal, held = calibration_windows(tok, 256), heldout_text()
ans, masks = answer_windows(tok, 256)
base = perplexity(src, tok, held)
say(f"source ppl {base:.3f}; answers: {len(ans)} windows, {sum(int(m.sum()) for m in masks)} response tokens")
if a.load:
    model = AutoModelForCausalLM.from_pretrained(a.load, dtype=torch.float32).eval()
elif a.drop:
    model = drop_layers(src, [int(i) for i in a.drop.split(",")])
else:
    fit, fm = (ans, masks) if a.data == "answers" else (cal, None)
    opts = FitOptions(
        steps=a.steps, lr=a.lr, kl_weight=a.kl, criterion=a.criterion, block_start=a.block_start
    )
    last = [0.0]

    def prog(d, t, m):
        if time.time() - last[0] > 60:
            last[0] = time.time()
            say(f"  {d}/{t} {m}")

    r = replace_block(src, cal, 7, fit, opts, progress=prog, masks=fm)
    model = r.model
    if r.block_distance:
        say("D(i):", " ".join(f"{d:.3f}" for d in r.block_distance))
    say(
        f"block {r.block.layers} init {r.block.init}; rel MSE {r.fit.mse_before:.5f} -> {r.fit.mse_after:.5f}"
    )
ppl = perplexity(model, tok, held)
say(
    f"L={model.config.num_hidden_layers} removed={1 - model.num_parameters() / src.num_parameters():.4f} "
    f"ppl {ppl:.3f} ratio {ppl / base:.3f}"
)
if a.heal_steps:
    texts = ans if a.heal_data == "answers" else cal
    h = heal(model, src, texts, steps=a.heal_steps)
    ppl = perplexity(model, tok, held)
    say(
        f"heal {a.heal_steps} on {a.heal_data}: KD {h.kd_before:.3f} -> {h.kd_after:.3f}; "
        f"ppl {ppl:.3f} ratio {ppl / base:.3f}"
    )
if a.save:
    model.save_pretrained(a.save)
    tok.save_pretrained(a.save)
    model = AutoModelForCausalLM.from_pretrained(a.save, dtype=torch.float32).eval()  # plain transformers
    say(f"reloaded from {a.save}: ppl {perplexity(model, tok, held):.3f}")
greedy = GenerationConfig(do_sample=False, max_new_tokens=24, pad_token_id=tok.eos_token_id)
chat = tok.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}],
    add_generation_prompt=True,
    return_tensors="pt",
    return_dict=True,
)["input_ids"]
for label, ids in (
    ("chat", chat),
    ("plain", tok("The capital of France is", return_tensors="pt").input_ids),
    ("story", tok("Once upon a time", return_tensors="pt").input_ids),
):
    out = model.generate(ids, generation_config=greedy)
    say(f"  sample {label}: {tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)!r}")

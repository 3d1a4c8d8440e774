"""Distilling step-by-step (arXiv 2305.02301) on a bundled task: is a rationale worth data?

Three bundled tasks (`--task`), 60 held-out records each, every record with a gold rationale:

- `shared_traits` (the default; workers/distill/shared_traits.py; 1,600 training records): traits of
  invented creatures of sixteen invented kinds whose trait values are shared between kinds, "What does a
  pleezpak eat?" -> "seeds", rationale "A pleezpak is a vantle. A vantle eats seeds." The held-out
  records ask a trait of a creature whose other traits are in the training split; the rationale states
  the creature's kind, which its labels determine only through modular relations between the values.
  The rationales carry knowledge, as a teacher's do in the paper.
- `kinds` (workers/distill/kinds.py; 400 training records): the same with eight kinds whose values are
  their own, so that one label names the kind.
- `multistep` (workers/distill/multistep.py): three-step arithmetic word problems with the worked steps;
  too hard for the small student within this machine's budget (docs/distill-step-by-step.md).

For each training-set size (12.5, 25, 50 and 100 % of the training split, nested, the same seed) a fresh
student is trained with the same options and the same number of steps

- `step_by_step`: the [label] and [rationale] tasks, L_label + lambda L_rationale (lambda = 1), on the
  rationales supplied in the data (the issue's fallback when the teacher's own rationales are too poor);
- `label_only`: the [label] task on the gold labels (standard fine-tuning);

and scored on the 60 held-out records (greedy label task; exact match after normalisation). The teacher:
the default model (SmolLM2-135M-Instruct) prompted few-shot with chain of thought (the job's template,
in-process engine at full depth) on `--teacher-test` held-out inputs (its few-shot accuracy) and on the
last `--teacher-train` training inputs; its parsed answers are filtered as the job filters them, and
`distill_labels` (standard distillation: the student trained on the teacher's kept labels) and
`step_by_step_teacher` (the student trained on the teacher's own kept rationales) are trained on what is
kept.

The student (`--student`): `small`, a LLaMA trained from scratch (hidden 128, 4 layers, 4 heads) with,
on `shared_traits`, a word tokenizer made from the task's records (one token per word: every creature
is one token, as a name is a few tokens in a real vocabulary; 0.86 M parameters) and on the other tasks
a character tokenizer (0.8 M), or `default`, the default model itself (SmolLM2-135M-Instruct,
its own tokenizer; lr 2e-4 unless `--lr`), several seconds a step on two cores.
Results and their reading: docs/distill-step-by-step.md.

Table: accuracy per method and size. Summary line:

    distill_step_by_step: sbs_beats_label_only=<k>/<sizes> data_fraction_to_match=<x> sbs_100=<x>
        label_only_100=<x> teacher_few_shot=<x> teacher_kept=<k>/<n> distill_labels=<x> seconds=<s>

where data_fraction_to_match is the smallest size at which step_by_step reaches label_only's accuracy at
100 % (none: at no size). `--quick` (a few steps, a few held-out records, a tiny random teacher) checks
that the pipeline runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from tests.tiny_models import DISTILL_VOCAB_SIZE, SPECIALS, distill_tokenizer  # noqa: E402
from workers.distill import kinds, multistep, shared_traits  # noqa: E402
from workers.distill.pipeline import DistillOptions, keep_teacher_answers  # noqa: E402
from workers.distill.prompts import (  # noqa: E402
    LABEL_PREFIX,
    RATIONALE_PREFIX,
    demonstrations_for,
    parse_answer,
    teacher_prompt,
)
from workers.distill.records import TaskSpec, is_correct  # noqa: E402
from workers.distill.student import label_accuracy, train_student  # noqa: E402
from workers.distill.teacher import AnswerCache, ask_teacher, engine_teacher  # noqa: E402
from workers.jobs.models import load_model  # noqa: E402

FRACTIONS = (0.125, 0.25, 0.5, 1.0)
TASKS = {"shared_traits": shared_traits, "kinds": kinds, "multistep": multistep}
# per task, for the small student: optimiser steps, AdamW weight decay and lr, and its tokenizer
# (docs/distill-step-by-step.md)
SMALL_DEFAULTS = {
    "shared_traits": (2000, 1.0, 5e-4, "words"),
    "kinds": (2000, 1.0, 2e-3, "characters"),
    "multistep": (150, 0.0, 2e-3, "characters"),
}


def word_tokenizer(records: list[dict]) -> PreTrainedTokenizerFast:
    """One token per word or sign of the records (and of the task prefixes), spaces dropped, after the
    special tokens of distill_tokenizer (the same ids); decoding joins tokens with spaces, which is enough
    for one-word labels."""
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.Split(Regex("[^A-Za-z0-9]"), behavior="isolated"),
        ]
    )
    texts = [LABEL_PREFIX, RATIONALE_PREFIX, "\n"]
    texts += [r[k] for r in records for k in ("input", "label", "rationale") if r.get(k)]
    words = sorted({word for text in texts for word, _ in pre.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(dict.fromkeys(SPECIALS + words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def student(kind: str, work: Path, seed: int, quick: bool, tokenizer):
    """A fresh student and its tokenizer: `small` (from scratch, with `tokenizer`) or `default` (the
    default model, SmolLM2-135M-Instruct, with its own tokenizer)."""
    if kind == "default" and not quick:
        from bench.merge_quality import default_model

        return load_model(default_model(work))
    return small_student(seed, quick, len(tokenizer)), tokenizer


def small_student(seed: int, quick: bool, vocab_size: int = DISTILL_VOCAB_SIZE) -> LlamaForCausalLM:
    size = (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
        if quick
        else dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4)
    )
    config = LlamaConfig(
        vocab_size=vocab_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
        **size,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def teacher_model(work: Path, quick: bool):
    if quick:
        from tests.tiny_models import make_tiny_chat_llama

        path = work / "tiny-teacher"
        if not (path / "config.json").exists():
            make_tiny_chat_llama(path, seed=0, max_position_embeddings=1024)
        return load_model(path), "tiny-random"
    from bench.merge_quality import default_model

    return load_model(default_model(work)), "SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--task", choices=list(TASKS), default="shared_traits", help="the bundled task")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distill-sbs-bench"))
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimiser steps a student (small: shared_traits and kinds 2000, multistep 150; default: 150)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="AdamW weight decay (small: shared_traits and kinds 1.0, multistep 0; default: 0)",
    )
    parser.add_argument(
        "--student",
        choices=("small", "default"),
        default="small",
        help="small: about 0.8 M parameters from scratch; default: SmolLM2-135M-Instruct",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="small: shared_traits 5e-4, else 2e-3; default: 2e-4"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher-train", type=int, default=None, help="training inputs asked (default 16)")
    parser.add_argument("--teacher-test", type=int, default=None, help="held-out inputs asked (default 16)")
    parser.add_argument("--shots", type=int, default=2, help="teacher demonstrations")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy box)")
    parser.add_argument(
        "--fractions", type=float, nargs="+", default=list(FRACTIONS), help="training-set sizes (1 = all)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the small student's initialisation and the trainer's batch order"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = TASKS[args.task]
    task = TaskSpec(**module.TASK)
    default_steps, default_decay, small_lr, tokens = SMALL_DEFAULTS[args.task]
    if args.student == "default":
        default_steps, default_decay = 150, 0.0
    steps = args.steps or (3 if args.quick else default_steps)
    weight_decay = default_decay if args.weight_decay is None else args.weight_decay
    teacher_train = args.teacher_train or (4 if args.quick else 16)
    teacher_test = args.teacher_test or (4 if args.quick else 16)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    train, test = module.load("train"), module.load("test")
    if args.quick:
        test = test[:4]
    lr = args.lr or (2e-4 if args.student == "default" else small_lr)
    small_tokenizer = word_tokenizer(train + test) if tokens == "words" else distill_tokenizer()
    options = DistillOptions(
        steps=steps,
        batch_size=args.batch_size,
        lr=lr,
        warmup_steps=steps // 10,
        schedule="cosine",
        max_length=256,
        seed=args.seed,
        weight_decay=weight_decay,
    )
    table: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}

    def run(name: str, size: str, records: list[dict], rationales: bool) -> None:
        t0 = time.perf_counter()
        fresh, tokenizer = student(args.student, args.work, args.seed, args.quick, small_tokenizer)
        model, stats = train_student(fresh, tokenizer, records, options, rationales=rationales)
        score = label_accuracy(model, tokenizer, task, test, options.label_max_new_tokens)
        table.setdefault(name, {})[size] = score["accuracy"]
        seconds[f"{name}@{size}"] = round(time.perf_counter() - t0, 1)
        print(
            f"{name} at {size}: accuracy {score['accuracy']:.3f} ({score['correct']}/{score['examples']}), "
            f"loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f}, {seconds[f'{name}@{size}']} s",
            flush=True,
        )

    for fraction in args.fractions:
        subset = train[: round(fraction * len(train))]
        size = f"{fraction:g}"
        run("step_by_step", size, subset, True)
        run("label_only", size, [{"input": r["input"], "label": r["label"]} for r in subset], False)

    # the teacher: few-shot CoT from the default model, its answers filtered as the job filters them
    t0 = time.perf_counter()
    (model, teacher_tokenizer), teacher_name = teacher_model(args.work, args.quick)
    demos = demonstrations_for(task, None, train)[: args.shots]
    asked_train, asked_test = train[-teacher_train:], test[:teacher_test]  # demos are train[:3]
    prompts = [teacher_prompt(task, demos, r["input"]) for r in asked_train + asked_test]
    complete = engine_teacher(model, teacher_tokenizer, None, max_new_tokens=48)
    cache = AnswerCache(args.work / f"teacher-{args.task}-{teacher_name}-{args.shots}shot.jsonl")
    answers, _ = ask_teacher(prompts, complete, cache, teacher_name)
    del model
    test_answers = answers[len(asked_train) :]
    right = sum(
        (p := parse_answer(task, a)) is not None and is_correct(task, p[1], r["label"])
        for a, r in zip(test_answers, asked_test, strict=True)
    )
    teacher_accuracy = right / len(asked_test)
    kept, counts = keep_teacher_answers(task, asked_train, answers[: len(asked_train)])
    seconds["teacher"] = round(time.perf_counter() - t0, 1)
    print(
        f"teacher {teacher_name} {args.shots}-shot: accuracy {teacher_accuracy:.3f} on {len(asked_test)}; "
        f"train answers {counts}; {seconds['teacher']} s",
        flush=True,
    )
    print("teacher sample answer:", json.dumps(test_answers[0][:300]), flush=True)
    if kept:
        run("distill_labels", "teacher", [{"input": r["input"], "label": r["label"]} for r in kept], False)
        run("step_by_step_teacher", "teacher", kept, True)

    sizes = [f"{f:g}" for f in args.fractions]
    print()
    print(
        f"| method | {' | '.join(f'{float(s) * 100:g} % ({round(float(s) * len(train))})' for s in sizes)} |"
    )
    print("|---|" + "---|" * len(sizes))
    for name in ("step_by_step", "label_only"):
        print(f"| {name} | " + " | ".join(f"{table[name][s]:.3f}" for s in sizes) + " |")
    if kept:
        for name in ("distill_labels", "step_by_step_teacher"):
            print(
                f"| {name} (on the teacher's {len(kept)} kept of {len(asked_train)}) | "
                f"{table[name]['teacher']:.3f} | | |"
            )
    print(
        f"| teacher {teacher_name} {args.shots}-shot CoT ({len(asked_test)} held-out) | "
        + " | ".join(f"{teacher_accuracy:.3f}" for _ in sizes)
        + " |"
    )

    beats = sum(table["step_by_step"][s] > table["label_only"][s] for s in sizes)
    target = table["label_only"]["1"]
    matched = [float(s) for s in sizes if table["step_by_step"][s] >= target]
    fraction_to_match = f"{min(matched):g}" if matched else "none"
    distill_labels = f"{table['distill_labels']['teacher']:.3f}" if kept else "none_kept"
    total = round(time.perf_counter() - started)
    print()
    print(
        f"distill_step_by_step: sbs_beats_label_only={beats}/{len(sizes)} data_fraction_to_match="
        f"{fraction_to_match} sbs_100={table['step_by_step']['1']:.3f} label_only_100={target:.3f} "
        f"teacher_few_shot={teacher_accuracy:.3f} teacher_kept={len(kept)}/{len(asked_train)} "
        f"distill_labels={distill_labels} seconds={total}"
    )
    if args.json:
        report = {
            "table": table,
            "teacher": {"name": teacher_name, "accuracy": teacher_accuracy, "filter": counts},
            "task": args.task,
            "student": args.student,
            "weight_decay": weight_decay,
            "seed": args.seed,
            "steps": steps,
            "lr": lr,
            "seconds": seconds,
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "load": os.getloadavg(),
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

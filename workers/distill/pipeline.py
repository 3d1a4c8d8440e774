"""Distilling step-by-step end to end: teacher answers, filtering, the student and its baselines, and
the held-out evaluation of all of them. No HTTP, no Redis: the job and the benchmark both call
`distill_step_by_step`.

1. Teacher: with rationales in the data ("data"), every record with a label and a rationale is kept;
   otherwise the teacher's few-shot CoT continuation of each training input is parsed (`prompts`) and the
   record is dropped, and counted, when it does not parse or its label disagrees with the gold label.
2. Students, each from a fresh copy of the same student with the same options and steps:
   `step_by_step` on the kept records' labels and rationales (L_label + lambda L_rationale), and per
   baseline `label_only` (gold labels of every labelled training record, standard fine-tuning) and
   `distill_labels` (the kept records' teacher labels only, standard distillation).
3. Evaluation: label-task accuracy of each on the evaluation records, and the teacher's own few-shot
   accuracy there when a teacher was queried (an unparseable answer counts as wrong).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from workers.distill.prompts import MAX_DEMONSTRATIONS, demonstrations_for, parse_answer, teacher_prompt
from workers.distill.records import TaskSpec, is_correct
from workers.distill.student import check_tokenizer, label_accuracy, train_student
from workers.distill.teacher import AnswerCache, Complete, ask_teacher
from workers.train.data import DataError
from workers.train.finetune import FinetuneConfig
from workers.train.trainer import StepInfo

Baseline = Literal["label_only", "distill_labels"]
Report = Callable[[str, int, int, str], None]  # phase, done, total, message


class Demonstration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(min_length=1, max_length=4000)
    rationale: str = Field(min_length=1, max_length=4000)
    label: str = Field(min_length=1, max_length=200)


class DistillOptions(FinetuneConfig):
    """The fine-tuning options (steps, lr schedule, batch, max_length, seed, LoRA or full), plus these."""

    rationale_weight: float = Field(default=1.0, ge=0, le=100, description="lambda in L_label + lambda L_rat")
    baselines: list[Baseline] = Field(default_factory=list, description="Students trained on labels only")
    demonstrations: list[Demonstration] | None = Field(
        default=None,
        max_length=MAX_DEMONSTRATIONS,
        description="The teacher's few-shot examples (default: the first 3 training records with a "
        "rationale, "
        "else the task type's built-in ones)",
    )
    teacher_max_new_tokens: int = Field(default=128, ge=8, le=2048, description="Tokens of a teacher answer")
    label_max_new_tokens: int = Field(default=16, ge=1, le=256, description="Tokens of a student's label")


def keep_teacher_answers(
    task: TaskSpec, records: Sequence[Mapping[str, str]], continuations: Sequence[str]
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Records relabelled with the teacher's rationale and label; dropped: unparseable, or disagreeing
    with the record's gold label."""
    kept, unparseable, disagree = [], 0, 0
    for record, text in zip(records, continuations, strict=True):
        parsed = parse_answer(task, text)
        if parsed is None:
            unparseable += 1
            continue
        rationale, label = parsed
        if record.get("label") is not None and not is_correct(task, label, record["label"]):
            disagree += 1
            continue
        kept.append({"input": record["input"], "rationale": rationale, "label": label})
    counts = {"queried": len(records), "kept": len(kept), "unparseable": unparseable, "disagree": disagree}
    return kept, counts


def _no_report(phase: str, done: int, total: int, message: str) -> None:
    return None


def distill_step_by_step(
    load_student: Callable[[], tuple[nn.Module, Any]],
    train_records: Sequence[Mapping[str, str]],
    eval_records: Sequence[Mapping[str, str]],
    task: TaskSpec,
    options: DistillOptions,
    *,
    teacher: Complete | None = None,
    teacher_id: str = "data",
    cache: AnswerCache | None = None,
    out_dir: Path | None = None,
    report: Report = _no_report,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run the three phases (module docstring); the step-by-step student is saved to `out_dir` (model
    and tokenizer) as soon as it is trained. Returns {"eval", "teacher_data", "training"}."""
    if any(r.get("label") is None for r in eval_records):
        raise DataError("every evaluation record needs a gold label")
    result: dict[str, Any] = {"eval": {}, "training": {}}
    if teacher is None:
        kept = [dict(r) for r in train_records if r.get("rationale") and r.get("label")]
        counts = {
            "records": len(train_records),
            "kept": len(kept),
            "no_rationale": len(train_records) - len(kept),
        }
    else:
        cache = cache or AnswerCache()
        demos = demonstrations_for(
            task, [d.model_dump() for d in options.demonstrations or []] or None, train_records
        )
        prompts = [teacher_prompt(task, demos, r["input"]) for r in [*train_records, *eval_records]]
        report("teacher", 0, len(prompts), f"asking the teacher about {len(prompts)} inputs")
        answers, cached = ask_teacher(
            prompts,
            teacher,
            cache,
            teacher_id,
            progress=lambda done, total: report("teacher", done, total, f"{done}/{total} answers"),
            should_stop=should_stop,
        )
        kept, counts = keep_teacher_answers(task, train_records, answers[: len(train_records)])
        counts["from_cache"] = cached
        teacher_answers = answers[len(train_records) :]
        right = 0
        for record, text in zip(eval_records, teacher_answers, strict=True):
            parsed = parse_answer(task, text)
            right += parsed is not None and is_correct(task, parsed[1], record["label"])
        result["eval"]["teacher"] = {
            "accuracy": round(right / len(eval_records), 4),
            "correct": right,
            "examples": len(eval_records),
            "unparseable": sum(parse_answer(task, t) is None for t in teacher_answers),
            "few_shot": len(demos),
        }
    result["teacher_data"] = counts
    if not kept:
        dropped = ", ".join(f"{v} {k}" for k, v in counts.items() if k not in ("kept", "from_cache") and v)
        raise DataError(f"no training records left after filtering the teacher's answers ({dropped})")

    runs: list[tuple[str, list[dict[str, str]], bool]] = [("step_by_step", kept, True)]
    for baseline in dict.fromkeys(options.baselines):
        if baseline == "label_only":
            gold = [{"input": r["input"], "label": r["label"]} for r in train_records if r.get("label")]
            if not gold:
                raise DataError("the label_only baseline needs gold labels in the training records")
            runs.append(("label_only", gold, False))
        else:
            runs.append(("distill_labels", [{"input": r["input"], "label": r["label"]} for r in kept], False))

    for index, (name, records, rationales) in enumerate(runs):
        model, tokenizer = load_student()
        check_tokenizer(tokenizer, [*records[:8], *eval_records[:8]])
        phase = f"training {name} ({index + 1}/{len(runs)})"

        def progress(info: StepInfo, phase: str = phase) -> None:
            report(phase, info.step, info.total, f"step {info.step}/{info.total}, loss {info.loss:.4f}")

        trained, stats = train_student(
            model,
            tokenizer,
            records,
            options,
            rationale_weight=options.rationale_weight,
            rationales=rationales,
            progress=progress,
            should_stop=should_stop,
        )
        if name == "step_by_step" and out_dir is not None:
            report(phase, 1, 1, "saving the student")
            trained.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
        report("evaluation", index, len(runs), f"{name} on {len(eval_records)} held-out records")
        result["training"][name] = stats
        result["eval"][name] = label_accuracy(
            trained, tokenizer, task, eval_records, options.label_max_new_tokens
        )
        del trained, model
    report("evaluation", len(runs), len(runs), "done")
    return result

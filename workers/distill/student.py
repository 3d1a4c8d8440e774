"""The student: multi-task training on the shared trainer, and label-task evaluation.

Each record gives a label row `[label] <input>\n -> <label>` and, when it has a rationale and rationales
are used, a rationale row `[rationale] <input>\n -> <rationale>`; the loss is on the target tokens (and EOS)
only. A batch's loss is

    L = L_label + lambda * L_rationale,

each term the token-mean next-token cross-entropy over the batch's rows of that task (a term is absent
when the batch has no row of its task). Rows are told apart by their prefix tokens, which are encoded on
their own so that they are the same ids in every row. With rationales the trainer's batch holds
2 x batch_size rows, so that a step sees on average batch_size inputs in each task, as in the paper where
every input of a batch gives both losses; label-only training (the baselines) uses batch_size rows and the
same number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.distill.prompts import LABEL_PREFIX, RATIONALE_PREFIX
from workers.distill.records import TaskSpec, is_correct
from workers.train.data import IGNORE_INDEX, Batch, DataError, EncodedExample, prepare_rows
from workers.train.finetune import FinetuneConfig, split_validation, train_and_merge
from workers.train.trainer import LossFn, StepInfo


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []


def prefix_ids(tokenizer, prefix: str) -> list[int]:
    return _bos(tokenizer) + _ids(tokenizer, prefix)


def prompt_ids(tokenizer, prefix: str, text: str) -> list[int]:
    """BOS + the prefix (encoded alone) + " <input>\n"."""
    return prefix_ids(tokenizer, prefix) + _ids(tokenizer, f" {text.strip()}\n")


def encode_task(tokenizer, prefix: str, text: str, target: str) -> EncodedExample:
    context = prompt_ids(tokenizer, prefix, text)
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    answer = _ids(tokenizer, target.strip()) + eos
    return EncodedExample(context + answer, [IGNORE_INDEX] * len(context) + answer)


def check_tokenizer(tokenizer, samples: Sequence[Mapping[str, str]]) -> None:
    """The student's tokenizer must spell the task prefixes and the records exactly (no unknown tokens,
    decoding gives the text back), tell the two prefixes apart, and have an EOS token to end an answer."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError("the student's tokenizer has no EOS token, so its answers could not end")
    unk = getattr(tokenizer, "unk_token_id", None)
    texts = [(repr(LABEL_PREFIX), LABEL_PREFIX), (repr(RATIONALE_PREFIX), RATIONALE_PREFIX)]
    for number, record in enumerate(samples, start=1):  # named by place: no record content is echoed
        texts += [
            (f"the {k} of record {number}", record[k])
            for k in ("input", "label", "rationale")
            if record.get(k)
        ]
    for shown, text in texts:
        ids = _ids(tokenizer, text)
        if (unk is not None and unk in ids) or tokenizer.decode(ids).strip() != text.strip():
            raise DataError(
                f"the student's tokenizer cannot spell {shown} (unknown or changed characters); the "
                f"{LABEL_PREFIX} / {RATIONALE_PREFIX} format needs a tokenizer that can"
            )
    label, rationale = prefix_ids(tokenizer, LABEL_PREFIX), prefix_ids(tokenizer, RATIONALE_PREFIX)
    if rationale[: len(label)] == label or label[: len(rationale)] == rationale:
        raise DataError("the student's tokenizer encodes the two task prefixes alike")


def task_rows(
    tokenizer, records: Sequence[Mapping[str, str]], rationales: bool, max_length: int
) -> tuple[list[EncodedExample], int]:
    """Label rows for every record with a label, rationale rows for those with a rationale (when
    `rationales`), cut to max_length; and how many rows were cut."""
    rows = [encode_task(tokenizer, LABEL_PREFIX, r["input"], r["label"]) for r in records]
    if rationales:
        rows += [
            encode_task(tokenizer, RATIONALE_PREFIX, r["input"], r["rationale"])
            for r in records
            if r.get("rationale")
        ]
    cut = sum(len(row.input_ids) > max_length for row in rows)
    return prepare_rows(rows, max_length, packing=False), cut


def multitask_loss(rationale_prefix: Sequence[int], rationale_weight: float) -> LossFn:
    """L_label + rationale_weight * L_rationale over one batch (see the module docstring)."""
    marker = torch.tensor(list(rationale_prefix), dtype=torch.long)

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if not bool(keep.any()):
            raise ValueError("the batch has no labelled tokens")
        width = marker.numel()
        head = batch.input_ids[:, :width]
        is_rationale = (head.shape[1] == width) & (head == marker.to(head.device)).all(dim=1)
        row_of = keep.nonzero()[:, 0]
        losses = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")
        rationale_tokens = is_rationale[row_of]
        total = losses.new_zeros(())
        if bool((~rationale_tokens).any()):
            total = total + losses[~rationale_tokens].mean()
        if bool(rationale_tokens.any()) and rationale_weight > 0:
            total = total + rationale_weight * losses[rationale_tokens].mean()
        return total

    return loss_fn


def train_student(
    model: nn.Module,
    tokenizer,
    records: Sequence[Mapping[str, str]],
    config: FinetuneConfig,
    *,
    rationale_weight: float = 1.0,
    rationales: bool = True,
    progress: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the student in place (LoRA merged when config.method == "lora"); the trained model on the
    CPU in eval mode, and what the run did (rows, steps, losses)."""
    train_records, held = split_validation(records, config.validation_fraction, config.seed)
    rows, cut = task_rows(tokenizer, train_records, rationales, config.max_length)
    val_rows, _ = task_rows(tokenizer, held, rationales, config.max_length) if held else ([], 0)
    if not rows:
        raise DataError("no training rows left after cutting records to max_length")
    train_config = config.train_config()
    if rationales:
        train_config = train_config.model_copy(update={"batch_size": 2 * config.batch_size})
    marker = prefix_ids(tokenizer, RATIONALE_PREFIX)
    trained, result = train_and_merge(
        model,
        tokenizer,
        rows,
        multitask_loss(marker, rationale_weight),
        config,
        train_config=train_config,
        val_rows=val_rows,
        progress=progress,
        should_stop=should_stop,
        device=device,
    )
    rationale_rows = sum(row.input_ids[: len(marker)] == marker for row in rows)
    report = {
        "steps": result.steps,
        "label_rows": len(rows) - rationale_rows,
        "rationale_rows": rationale_rows,
        "truncated": cut,
        "first_loss": round(result.first_loss, 5),
        "final_loss": round(result.final_loss, 5),
        "val_losses": {k: round(v, 5) for k, v in result.val_losses.items()},
        "seconds": round(result.seconds, 3),
    }
    return trained.eval(), report


@torch.inference_mode()
def predict_labels(
    model: nn.Module, tokenizer, inputs: Sequence[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy label-task answers (`[label] <input>\n` -> text up to EOS or the first newline)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    model.eval()
    device = next(model.parameters()).device  # a student trained on a GPU stays there
    for start in range(0, len(inputs), batch_size):
        prompts = [prompt_ids(tokenizer, LABEL_PREFIX, text) for text in inputs[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        out += [text.strip().split("\n", 1)[0] if text.strip() else "" for text in texts]
    return out


def label_accuracy(
    model: nn.Module, tokenizer, task: TaskSpec, records: Sequence[Mapping[str, str]], max_new_tokens: int
) -> dict[str, Any]:
    """The student's accuracy on labelled records: {"accuracy", "correct", "examples"}."""
    replies = predict_labels(model, tokenizer, [r["input"] for r in records], max_new_tokens)
    correct = sum(is_correct(task, reply, r["label"]) for reply, r in zip(replies, records, strict=True))
    return {"accuracy": round(correct / len(records), 4), "correct": correct, "examples": len(records)}

"""The teacher's few-shot chain-of-thought prompt and the student's two tasks.

Teacher (plain-text few-shot prompt, one instruction line per task type, then the demonstrations and the
query in the same format):

    <instruction>

    Input: <demo input>
    Reasoning: <demo rationale>
    Answer: <demo label>

    ...

    Input: <query>
    Reasoning:

The stated answer format: the teacher continues with its rationale on one or more lines, then a line
`Answer: <label>`; generation stops at a blank line or a new "Input:". A continuation without an
"Answer:" line, with an empty rationale, or (classification, multiple choice) with a label outside the
label set does not parse.

Student (the paper's task prefixes): `[label] <input>\n` -> `<label>` and `[rationale] <input>\n` ->
`<rationale>`; only the label task runs at inference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from workers.distill.records import TaskSpec, canonical_label

LABEL_PREFIX = "[label]"
RATIONALE_PREFIX = "[rationale]"
STOPS = ["\n\n", "\nInput:"]
MAX_DEMONSTRATIONS = 8

INSTRUCTIONS = {
    "short_answer": "Answer each question. Think step by step, write the reasoning, then give the final "
    "answer alone after 'Answer:'.",
    "classification": "Classify each input as one of: {labels}. Think step by step, write the reasoning, "
    "then give the label alone after 'Answer:'.",
    "multiple_choice": "Choose the correct option ({labels}) for each question. Think step by step, write "
    "the reasoning, then give the option alone after 'Answer:'.",
}

# Used when the user gives no demonstrations and no training record has a rationale.
DEFAULT_DEMONSTRATIONS = {
    "short_answer": [
        {
            "input": "A shelf holds 3 rows of 4 books. Ann adds 5 books. How many books are on the shelf?",
            "rationale": "3 rows of 4 books is 3 * 4 = 12 books. Adding 5 gives 12 + 5 = 17.",
            "label": "17",
        },
        {
            "input": "Sam had 20 stamps, gave 6 to Lee and then bought 2. How many stamps does Sam have?",
            "rationale": "After giving 6 away Sam has 20 - 6 = 14. Buying 2 gives 14 + 2 = 16.",
            "label": "16",
        },
    ],
}


def instruction(task: TaskSpec) -> str:
    return INSTRUCTIONS[task.type].format(labels=", ".join(task.label_set or []))


def _block(record: Mapping[str, str]) -> str:
    return f"Input: {record['input'].strip()}\nReasoning: {record['rationale'].strip()}\n" + (
        f"Answer: {record['label'].strip()}"
    )


def demonstrations_for(
    task: TaskSpec,
    given: Sequence[Mapping[str, str]] | None,
    records: Sequence[Mapping[str, str]],
    k: int = 3,
) -> list[dict[str, str]]:
    """The user's demonstrations; else the first `k` training records with a rationale and a label; else
    the built-in ones of the task type (short answers only: a label set's meaning is the user's)."""
    if given:
        return [dict(d) for d in given[:MAX_DEMONSTRATIONS]]
    found = [dict(r) for r in records if r.get("rationale") and r.get("label")][:k]
    if found:
        return found
    if task.type in DEFAULT_DEMONSTRATIONS:
        return [dict(d) for d in DEFAULT_DEMONSTRATIONS[task.type]]
    raise ValueError(
        f"a {task.type} task needs demonstrations (give 'demonstrations', or records with a rationale)"
    )


def teacher_prompt(task: TaskSpec, demonstrations: Sequence[Mapping[str, str]], query: str) -> str:
    shots = "\n\n".join(_block(d) for d in demonstrations)
    return f"{instruction(task)}\n\n{shots}\n\nInput: {query.strip()}\nReasoning:"


ANSWER = re.compile(r"^\s*(?P<rationale>.*?)\s*\n?\s*Answer\s*:\s*(?P<label>[^\n]*)", re.S)


def parse_answer(task: TaskSpec, continuation: str) -> tuple[str, str] | None:
    """(rationale, label) from the teacher's continuation of `teacher_prompt`, or None if it does not
    follow the format (see the module docstring)."""
    for stop in STOPS:
        at = continuation.find(stop)
        if at >= 0:
            continuation = continuation[:at]
    continuation = re.sub(r"^\s*Reasoning\s*:", "", continuation)  # a chat model may repeat the cue
    found = ANSWER.match(continuation)
    if found is None:
        return None
    rationale = " ".join(found.group("rationale").split())
    label = canonical_label(task, found.group("label"))
    if not rationale or label is None:
        return None
    return rationale, label


def student_prompt(prefix: str, text: str) -> str:
    return f"{prefix} {text.strip()}\n"

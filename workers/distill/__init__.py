"""Distilling step-by-step (Hsieh et al., 2023, arXiv 2305.02301): a teacher's rationales as extra
supervision for a small task model.

- `records`: the data (`{"input", "label"?, "rationale"?}` records), the task types and their scorers.
- `prompts`: the teacher's few-shot chain-of-thought prompt, its answer format and the parser, and the
  student's two task prefixes.
- `teacher`: where rationales come from (the data, a registered model run in-process, a configured
  OpenAI-compatible endpoint), cached so that a retried job does not ask again.
- `student`: the multi-task loss L_label + lambda L_rationale on the shared trainer, and evaluation.
- `kinds`, `multistep`: the bundled generated tasks (traits of invented creatures, whose rationales
  state the creature's kind; multi-step arithmetic with worked steps as gold rationales), their files
  read and written as workers/tasks.py does the chat tasks'.
"""

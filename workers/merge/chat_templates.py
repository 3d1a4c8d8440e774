"""Chat templates a merge recipe may name instead of giving the Jinja text."""

from __future__ import annotations

# ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then "<|im_start|>assistant\n" when a
# generation prompt is asked for (renders as mergekit 0.1.5's `chatml`).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

NAMED_TEMPLATES = {"chatml": CHATML}

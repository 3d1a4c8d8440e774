"""LoRA adapters: extraction from a fine-tune and its base (PEFT format)."""

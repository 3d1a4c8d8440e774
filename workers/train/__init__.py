"""Training: Sorted Fine-Tuning of early exits, SFT data, truncation to an exit."""

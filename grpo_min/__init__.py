"""grpo_min: GRPO for vision-language grounding in plain PyTorch (see README.md)."""

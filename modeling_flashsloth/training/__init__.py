"""Training FlashSloth on transformers' Trainer: LLaVA-format data, the paper's two stages, LoRA, several processes."""

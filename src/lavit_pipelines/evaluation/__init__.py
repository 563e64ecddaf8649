"""LaVIT's zero-shot evaluations (captioning, VQA, text-to-image) and the synthetic shapes benchmark."""

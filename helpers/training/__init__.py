"""Training: datasets, the shared accelerate loop, LoRA, DreamBooth, export."""

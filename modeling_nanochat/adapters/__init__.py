"""PEFT adapters (LoRA) on our model and their merged export."""

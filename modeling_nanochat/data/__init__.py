"""Pretraining data: sources, the BOS-aligned loader, the synthetic world."""

"""The compression lab: quantize, prune, and measure trained models (see recipes/quantize.py, prune.py, compress.py)."""

"""Evaluation of base and chat models: CORE (`evaluation.core`), bits per byte, ChatCORE.

Submodules are imported on use, so `python -m evaluation.core` loads only what CORE needs.
"""

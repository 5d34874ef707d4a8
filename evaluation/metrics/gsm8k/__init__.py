"""GSM8K grading: plain functions in extraction.py, the `evaluate` module in gsm8k.py
(``evaluate.load("evaluation/metrics/gsm8k")``)."""

"""Stage: GRPO on TRL's GRPOTrainer with the calculator, rewards chosen by name."""

"""Stage: chat SFT on TRL's SFTTrainer with nanochat's mixture."""

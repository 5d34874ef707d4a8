"""The BPE tokenizer, its chat rendering and token byte lengths."""

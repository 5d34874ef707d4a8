"""Held-out parity with nanochat's own code: cached greedy `generate()` of our model equals nanochat's `GPT.generate`
token for token, on checkpoints this project's tests have never seen.

    python bench/heldout_parity.py --nanochat-dir ~/src/nanochat [--new-tokens 32]

For each configuration below, nanochat's `GPT` is built by nanochat's code (meta device, `init_weights`), every
parameter is perturbed with seeded noise (so zero-initialised projections, the smear and the backout all matter),
and saved in nanochat's checkpoint layout; the converter's reader maps it to our model, saved as a Hugging Face
directory that `AutoModelForCausalLM.from_pretrained` loads. Prompts of 100-500 random tokens start with <|bos|>, several longer
than the short window, and the decode runs past it. fp32 on CPU. Prints one JSON object; exits 1 on any mismatch.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.nanochat_runtime import import_nanochat  # noqa: E402

# sizes unlike every fixture in tests/ (those are d4, n_embd 64, T=256): other depths, widths, head counts, GQA, T=1024
CONFIGS = [
    dict(n_layer=5, n_head=2, n_kv_head=2, n_embd=128, vocab_size=700, sequence_len=1024, window_pattern="SSSL"),
    dict(n_layer=6, n_head=4, n_kv_head=1, n_embd=128, vocab_size=1000, sequence_len=1024, window_pattern="SSSL"),
    dict(n_layer=3, n_head=3, n_kv_head=3, n_embd=96, vocab_size=515, sequence_len=1024, window_pattern="SL"),
]
PROMPT_LENGTHS = [100, 180, 300, 500]  # the short window is 256 at T=1024 (SL/SSSL)


def perturbed_nanochat(cfg, seed):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(GPTConfig(**cfg))
    model.to_empty(device="cpu")
    model.init_weights()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight":
                sigma = 1.0
            elif p.dim() < 2 or p.numel() < 64:
                sigma = 0.3
            else:
                sigma = max(0.5 * p.float().std().item(), 0.05)
            p.add_((torch.randn(p.shape, generator=g) * sigma).to(p.dtype))
    return model.float().eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanochat-dir", required=True, help="a clone of karpathy/nanochat (its code is run, not copied)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    import_nanochat(args.nanochat_dir, torch.float32)
    from transformers import AutoModelForCausalLM

    import modeling_nanochat  # noqa: F401 - registers the model type
    from modeling_nanochat import NanoChatForCausalLM
    from modeling_nanochat.checkpoints.convert import load_nanochat_checkpoint

    results, ok = [], True
    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        for c, cfg in enumerate(CONFIGS):
            theirs = perturbed_nanochat(cfg, args.seed + c)
            src = Path(work) / f"nanochat_{c}"
            src.mkdir()
            torch.save(theirs.state_dict(), src / "model_000001.pt")
            (src / "meta_000001.json").write_text(json.dumps({"step": 1, "model_config": cfg}))
            state, config, _, era = load_nanochat_checkpoint(str(src))  # the converter's reader (no tokenizer here)
            assert era == "2026-03-14", era
            hf = NanoChatForCausalLM(config)
            hf.load_state_dict(state)
            hf.save_pretrained(Path(work) / f"hf_{c}")
            ours = AutoModelForCausalLM.from_pretrained(Path(work) / f"hf_{c}").eval()
            bos = ours.config.bos_token_id
            for n in PROMPT_LENGTHS:
                g = torch.Generator().manual_seed(args.seed + 100 * c + n)
                prompt = [bos] + torch.randint(0, bos, (n - 1,), generator=g).tolist()
                with torch.no_grad():
                    want = [t for _, t in zip(range(args.new_tokens), theirs.generate(prompt, args.new_tokens,
                                                                                      temperature=0.0))]
                    # the attention mask a tokenizer gives: without it, generate() would take the leading <|bos|>
                    # for left padding (nanochat pads with <|bos|>) once eos_token_id no longer lists it
                    ids = torch.tensor([prompt])
                    out = ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                        do_sample=False, eos_token_id=None, pad_token_id=bos)
                got = out[0, n:].tolist()
                first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
                same = got == want
                ok &= same
                results.append(dict(config=c, n_layer=cfg["n_layer"], n_embd=cfg["n_embd"], n_head=cfg["n_head"],
                                    n_kv_head=cfg["n_kv_head"], window_pattern=cfg["window_pattern"],
                                    short_window=ours.config.short_window, prompt_tokens=n, same_tokens=same,
                                    first_difference=first_diff, distinct_tokens=len(set(want))))
    import transformers
    print(json.dumps({"bench": "heldout_parity", "all_identical": ok, "cases": len(results),
                      "identical": sum(r["same_tokens"] for r in results), "new_tokens": args.new_tokens,
                      "transformers": transformers.__version__, "torch": torch.__version__,
                      "machine": platform.machine(), "seconds": round(time.time() - started, 1), "results": results}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

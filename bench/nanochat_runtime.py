"""nanochat's own code for the benchmarks' comparisons: imported at run time from the user's checkout (never copied
into this repo) and run on the same weights as ours, converted with `modeling_nanochat.checkpoints.convert.to_nanochat`."""

import json
import os
import sys
from pathlib import Path

import torch


def import_nanochat(nanochat_dir: str, dtype: torch.dtype = torch.float32) -> None:
    """Make `import nanochat` load the checkout at `nanochat_dir`, computing in `dtype` (its NANOCHAT_DTYPE)."""
    path = os.path.abspath(os.path.expanduser(nanochat_dir))
    if not os.path.isfile(os.path.join(path, "nanochat", "gpt.py")):
        raise SystemExit(f"--nanochat-dir {nanochat_dir}: no nanochat/gpt.py there; point it at a clone of "
                         "https://github.com/karpathy/nanochat")
    os.environ.setdefault("NANOCHAT_DTYPE", str(dtype).removeprefix("torch."))  # read once, when nanochat is imported
    sys.path.insert(0, path)
    try:
        import nanochat.engine  # noqa: F401 - pulls in the rest (gpt, tokenizer, checkpoint_manager)
    except ImportError as e:
        raise SystemExit(f"nanochat's code needs {e.name}: pip install {e.name} (or the project's dev extra)") from e


def nanochat_gpt(model_dir: str, device, workdir: str):
    """nanochat's GPT holding the weights of our checkpoint `model_dir`, built the way nanochat builds one for
    inference (meta device, to_empty, init_weights for the rotary tables, then the weights)."""
    from nanochat.gpt import GPT, GPTConfig

    from modeling_nanochat.checkpoints.convert import to_nanochat

    src = Path(to_nanochat(model_dir, os.path.join(workdir, "nanochat"), overwrite=True))
    meta_path = next(src.glob("meta_*.json"))
    meta = json.loads(meta_path.read_text())
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["model_config"]))
    model.to_empty(device=device)
    model.init_weights()
    step = meta_path.stem.split("_")[1]
    model.load_state_dict(torch.load(src / f"model_{step}.pt", map_location=device, weights_only=True))
    return model.eval()

"""Depth pruning: drop the transformer blocks whose removal costs the least validation bits per byte.

What makes this nanochat's and not a generic "delete layer i": every block carries per-layer state outside
`model.layers` (a value embedding on alternating layers, a short or long attention window, a resid/x0 lambda
pair), and the config derives those layouts from the layer count. A pruned model must keep each surviving block
*exactly* as it was trained, so the smaller config states its layout explicitly:

* `window_pattern` becomes the kept blocks' own S/L letters (one letter per layer, so nothing is re-tiled);
* `value_embed_layers` lists the kept blocks that had a value embedding, renumbered (not the alternating rule,
  which would move them);
* the lambdas are sliced to the kept blocks.

Two things cannot be kept exactly and are measured rather than hidden: the backout point is derived as
`num_layers // 2` (it may move by a block), and the final block is never a candidate, because nanochat gives the
last block full context and the new last block would change its window. The healing run (pretraining with
`--init-from`) absorbs both; `recipes/prune.py` reports bpb before pruning, after, and after healing.
"""

from __future__ import annotations

import re
from collections.abc import Callable


from modeling_nanochat.utils.errors import NanochatError


class PruneError(NanochatError):
    """A pruning request the model cannot satisfy (too many blocks, a bad index)."""


# config fields derived from the layer count: the pruned config must not carry the old ones
_DERIVED = ("layer_types", "sliding_window", "num_hidden_layers", "depth", "window_pattern", "value_embed_layers",
            "value_embeds")


def pruned_config(config, drop: list[int]):
    """The config of `config`'s model without blocks `drop`, every kept block with its own window and value
    embedding (see the module docstring)."""
    n = config.num_hidden_layers
    keep = [i for i in range(n) if i not in set(drop)]
    letters = "".join("S" if config.layer_types[i] == "sliding_attention" else "L" for i in keep)
    fields = {k: v for k, v in config.to_dict().items() if k not in _DERIVED}
    fields.update(num_hidden_layers=len(keep),
                  window_pattern=letters if config.window_pattern is not None else None,
                  value_embed_layers=[keep.index(i) for i in config.value_embed_layers if i in keep],
                  value_embeds=any(i in keep for i in config.value_embed_layers))
    return type(config).from_dict(fields)


_LAYER_KEY = re.compile(r"^(model\.(?:layers|value_embeds))\.(\d+)\.(.*)$")
_PER_LAYER = ("model.resid_lambdas", "model.x0_lambdas")


def drop_blocks(model, drop: list[int]):
    """A new model (same class, dtype and device) holding `model` without blocks `drop`: renumbered blocks and value
    embeddings, sliced lambdas, everything else copied."""
    n = model.config.num_hidden_layers
    drop = sorted(set(drop))
    if any(not 0 <= i < n for i in drop):
        raise PruneError(f"blocks {drop}: the model has blocks 0..{n - 1}", "pick indices in that range")
    if n - 1 in drop:
        raise PruneError(f"block {n - 1} is the last one (full context); nanochat's layout keeps it",
                         "drop other blocks")
    keep = [i for i in range(n) if i not in drop]
    new_index = {old: new for new, old in enumerate(keep)}
    config = pruned_config(model.config, drop)
    state = {}
    for key, value in model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m:
            old = int(m.group(2))
            if old in new_index:
                state[f"{m.group(1)}.{new_index[old]}.{m.group(3)}"] = value
        elif key in _PER_LAYER:
            state[key] = value[keep]
        else:
            state[key] = value
    param = next(model.parameters())
    pruned = type(model)(config)  # fresh init, then every parameter overwritten: strict load proves the layout
    pruned.load_state_dict(state, strict=True)
    return pruned.to(device=param.device, dtype=param.dtype).eval()


def prune_depth(model, num_drop: int, evaluate: Callable[[object], float],
                progress: Callable[[str], None] | None = None):
    """Greedy depth pruning: `num_drop` times, try removing each candidate block of the current model, keep the
    removal with the lowest `evaluate(model)` (val bpb). Returns (pruned model, record) where the record lists each
    round's cost of every candidate, in the ORIGINAL block numbering."""
    n = model.config.num_hidden_layers
    if num_drop < 1 or num_drop > n - 1:
        raise PruneError(f"--drop {num_drop}: a {n}-block model can lose 1..{n - 1} blocks (the last block stays)",
                         f"pass --drop between 1 and {n - 1}")
    say = progress or (lambda msg: None)
    base = evaluate(model)
    say(f"unpruned: val bpb {base:.4f}")
    original = list(range(n))  # original index of each current block
    current, rounds = model, []
    for r in range(num_drop):
        costs = {}
        for i in range(current.config.num_hidden_layers - 1):  # the last block is never a candidate
            candidate = drop_blocks(current, [i])
            costs[original[i]] = evaluate(candidate) - base
            say(f"round {r + 1}: without block {original[i]}: val bpb +{costs[original[i]]:.4f}")
            del candidate
        best = min(costs, key=costs.get)
        current = drop_blocks(current, [original.index(best)])
        original.remove(best)
        rounds.append({"dropped": best, "cost_bpb": costs[best], "costs": costs})
    return current, {"unpruned_bpb": base, "rounds": rounds, "kept_blocks": original,
                     "dropped_blocks": [r["dropped"] for r in rounds], "pruned_bpb": base + rounds[-1]["cost_bpb"]}

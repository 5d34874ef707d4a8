"""Depth pruning keeps every surviving block exactly as trained: its weights, its window, its value embedding and
its lambdas. Proven against the unpruned model running with the dropped block replaced by the identity."""

import pytest
import torch
from conftest import perturbed_model, tiny_config

from modeling_nanochat.compression.prune import PruneError, drop_blocks, prune_depth, pruned_config


def _config(**kw):
    # 6 blocks, windows S S L S S L (last forced L), value embeddings on 1, 3, 5; backout off so that the only
    # difference between "pruned" and "block skipped" would be a bug (backout_layer is derived from the depth)
    return tiny_config(**{"depth": 6, "window_pattern": "SSL", "max_position_embeddings": 64, "backout": False, **kw})


def _skip_block(model, i):
    """The unpruned model with block i turned into the identity (its lambdas neutral)."""
    layer = model.model.layers[i]
    layer.forward = lambda x, *a, **k: (x, None)
    with torch.no_grad():
        if model.model.resid_lambdas is not None:
            model.model.resid_lambdas[i] = 1.0
            model.model.x0_lambdas[i] = 0.0
    return model


@pytest.mark.parametrize("drop", [[0], [1], [2], [1, 3], [0, 2, 4]])
def test_pruned_model_equals_skipping_the_blocks(drop):
    model = perturbed_model(_config(), seed=3)
    pruned = drop_blocks(model, drop)
    keep = [i for i in range(6) if i not in drop]
    assert pruned.config.num_hidden_layers == len(keep)
    assert pruned.config.layer_types == [model.config.layer_types[i] for i in keep]
    assert pruned.config.value_embed_layers == [keep.index(i) for i in (1, 3, 5) if i in keep]
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model
        for i in drop:
            ref = _skip_block(ref, i)
        want = ref(ids).logits
        got = pruned(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_pruned_model_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    import modeling_nanochat  # noqa: F401

    pruned = drop_blocks(perturbed_model(_config(backout=True), seed=1), [2])
    pruned.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.num_hidden_layers == 5 and back.config.layer_types == pruned.config.layer_types
    ids = torch.randint(0, 500, (1, 30))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, pruned(ids).logits)


def test_greedy_rounds_drop_the_cheapest_block_and_never_the_last():
    model = perturbed_model(_config(), seed=5)
    ids = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(1))

    def loss(m):
        with torch.no_grad():
            return m(ids, labels=ids).loss.item()

    pruned, record = prune_depth(model, 2, loss)
    assert pruned.config.num_hidden_layers == 4
    first, second = record["rounds"]
    assert 5 not in first["costs"] and set(first["costs"]) == {0, 1, 2, 3, 4}
    assert first["dropped"] == min(first["costs"], key=first["costs"].get)
    assert first["dropped"] not in second["costs"] and len(second["costs"]) == 4
    assert record["dropped_blocks"] == [first["dropped"], second["dropped"]]
    assert record["kept_blocks"] == [i for i in range(6) if i not in record["dropped_blocks"]]
    assert record["pruned_bpb"] == pytest.approx(loss(pruned), abs=1e-6)


def test_impossible_requests_are_refused_with_the_fix():
    model = perturbed_model(_config(), seed=0)
    with pytest.raises(PruneError, match="last one"):
        drop_blocks(model, [5])
    with pytest.raises(PruneError, match="0..5"):
        drop_blocks(model, [7])
    with pytest.raises(PruneError, match="--drop"):
        prune_depth(model, 6, lambda m: 0.0)


def test_dropping_every_value_embedding_layer_turns_them_off():
    cfg = pruned_config(tiny_config(depth=4, value_embed_layers=[1]), [1])
    assert cfg.value_embed_layers == [] and not cfg.value_embeds


@pytest.mark.slow
def test_prune_recipe_prunes_heals_and_reports(tmp_path):
    """recipes/prune.py end to end: the pruned and healed models load with one block less, prune.json holds the
    bpb of all three on the same val tokens, and a second run into the same dir is refused."""
    import json
    import subprocess
    import sys

    from app_helpers import tiny_checkpoint
    from conftest import REPO
    from transformers import AutoModelForCausalLM

    subprocess.run([sys.executable, "-m", "modeling_nanochat.data.synthetic", "--output-dir", str(tmp_path / "d")],
                   check=True, capture_output=True, cwd=REPO)
    _, _, model_dir = tiny_checkpoint(tmp_path / "m")
    cmd = [sys.executable, str(REPO / "recipes" / "prune.py"), "--model", model_dir, "--drop", "1",
           "--data", str(tmp_path / "d" / "pretrain"), "--output-dir", str(tmp_path / "out"), "--eval-tokens", "2048",
           "--heal-steps", "3", "--", "--total-batch-size", "1024", "--device-batch-size", "4", "--warmup-steps", "1",
           "--eval-every", "-1"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "prune.json").read_text())
    assert record["blocks"] == [4, 3] and len(record["dropped_blocks"]) == 1 and record["dropped_blocks"][0] != 3
    assert record["pruned_bpb"] > 0 and record["healed_bpb"] > 0 and record["unpruned_bpb"] > 0
    for sub in ("pruned", "healed"):
        m = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / sub)
        assert m.config.num_hidden_layers == 3
    assert "| healed | 3 |" in p.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr

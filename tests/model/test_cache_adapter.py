"""The one place our model leans on transformers' cache internals (modeling_nanochat.py, "adapter: transformers'
dynamic cache layers"): our layers write keys/values in place and must give exactly what transformers' own layers
give. These tests replay the same operations through both, so a transformers release that changes the layers'
fields or semantics fails here, loudly, instead of decoding wrong tokens somewhere else."""

import pytest
import torch

from modeling_nanochat.modeling_nanochat import IN_PLACE_CACHE_LAYERS, _V5_MASKS

pytestmark = pytest.mark.skipif(not _V5_MASKS, reason="transformers 4.x has no cache layers (the 4.x lane loads "
                                                      "remote code only, see test_remote_code.py)")


def test_the_in_place_layers_are_active():
    """If the fields our layers use disappear, the model silently falls back to transformers' layers (correct but
    slower): that must be noticed and the adapter updated."""
    assert IN_PLACE_CACHE_LAYERS


def _pair(sliding_window=None):
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    from modeling_nanochat.modeling_nanochat import _IN_PLACE_LAYER_CLASSES
    if sliding_window is None:
        return DynamicLayer(), _IN_PLACE_LAYER_CLASSES[DynamicLayer]()
    return (DynamicSlidingWindowLayer(sliding_window=sliding_window),
            _IN_PLACE_LAYER_CLASSES[DynamicSlidingWindowLayer](sliding_window=sliding_window))


def _same(theirs, ours, returned=None):
    assert theirs.get_seq_length() == ours.get_seq_length()
    assert torch.equal(theirs.keys, ours.keys) and torch.equal(theirs.values, ours.values)
    for q in (1, 5):
        assert theirs.get_mask_sizes(q) == ours.get_mask_sizes(q)
    if returned is not None:
        (tk, tv), (ok, ov) = returned
        assert torch.equal(tk, ok) and torch.equal(tv, ov)


def _kv(t, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, t, 8, generator=g), torch.randn(batch, 2, t, 8, generator=g)


@pytest.mark.parametrize("window", [None, 6, 300])  # full, a window reached early, a window past the buffer size
def test_updates_and_batch_operations_match_transformers(window):
    theirs, ours = _pair(window)
    steps = [5, 1, 1, 3, 1] + [1] * 300  # prefill, decode steps, a chunk, then past the 256-token first buffer
    batch = 2
    with torch.no_grad():
        for i, t in enumerate(steps):
            k, v = _kv(t, batch=batch, seed=i)
            _same(theirs, ours, (theirs.update(k, v), ours.update(k, v)))
            if i == 7:
                idx = torch.tensor([1, 0])
                theirs.reorder_cache(idx), ours.reorder_cache(idx)
                _same(theirs, ours)
            if i == 9:
                theirs.batch_repeat_interleave(2), ours.batch_repeat_interleave(2)
                batch = 4
                _same(theirs, ours)
            if i == 11:
                idx = torch.tensor([0, 3])
                theirs.batch_select_indices(idx), ours.batch_select_indices(idx)
                batch = 2
                _same(theirs, ours)


def test_crop_matches_transformers():
    theirs, ours = _pair()
    with torch.no_grad():
        for i, t in enumerate([10, 1, 4]):
            k, v = _kv(t, seed=i)
            theirs.update(k, v), ours.update(k, v)
        theirs.crop(-3), ours.crop(-3)
        _same(theirs, ours)
        k, v = _kv(2, seed=9)
        _same(theirs, ours, (theirs.update(k, v), ours.update(k, v)))


def test_past_recording_and_gradients_use_transformers_own_update():
    """While transformers records the past for a rollback (assisted decoding) or autograd is on, the plain update
    runs (in-place writes would corrupt a rollback or a saved activation)."""
    theirs, ours = _pair(4)
    if not hasattr(theirs, "activate_past_recording"):
        pytest.skip("this transformers has no past recording")
    theirs.activate_past_recording(), ours.activate_past_recording()
    with torch.no_grad():
        for i, t in enumerate([6, 1, 3]):
            k, v = _kv(t, seed=i)
            _same(theirs, ours, (theirs.update(k, v), ours.update(k, v)))
        theirs.crop(-2), ours.crop(-2)
        _same(theirs, ours)
    theirs, ours = _pair()
    k, v = _kv(3)
    k.requires_grad_(True)
    with torch.enable_grad():
        ours.update(k, v)
        assert ours.keys.grad_fn is not None

"""NanoChat (karpathy/nanochat) as a transformers model.

One flat file in the style of transformers' `modeling_llama.py`. It is saved next to every checkpoint and loaded as
remote code, so it imports only torch, transformers and its sibling configuration file, and it keeps working on
transformers 4.51 (TGI's pin): every import that differs between 4.x and 5.x is guarded.

What nanochat does differently from Llama, and where it lives here:
- weightless RMSNorm everywhere (eps = fp32 machine epsilon), also right after the embedding    -> `rms_norm`
- smear: x[t] += smear_lambda * sigmoid(gate(x[t, :24])) * x[t-1] on the normalized embedding     -> `NanoChatModel._smear`
- resid/x0 lambdas before every block, backout of the mid-depth residual before the final norm   -> `NanoChatModel.forward`
- value embeddings mixed into v with a per-KV-head gate on alternating layers                     -> `NanoChatAttention`
- RoPE (half split, rotating by -theta) then QK-norm then q,k *= 1.2                               -> `NanoChatAttention`
- S/L sliding windows per layer                                                                    -> `layer_types` + masks
- ReLU^2 MLP, untied padded head, fp32 logit softcap                                               -> `NanoChatMLP`, `NanoChatForCausalLM`
All architecture tricks live in the base model (servers such as vLLM replace the head); only the softcap, which
acts on logits, sits in the CausalLM head.
"""

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_nanochat import NanoChatConfig

try:  # transformers >= 4.48
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover
    ALL_ATTENTION_FUNCTIONS = {}

try:  # transformers >= 4.52: gradient checkpointing through the layer class
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover - 4.51
    _LayerBase = nn.Module

try:  # transformers >= 5: mask factories that understand packed position_ids, padding, caches and flex/flash
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask, sliding_window_overlay
    _V5_MASKS = "inputs_embeds" in inspect.signature(create_causal_mask).parameters
except ImportError:  # pragma: no cover - 4.x
    _V5_MASKS = False
if _V5_MASKS:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
try:  # transformers >= 5: caches made of per-layer objects
    from transformers.cache_utils import StaticLayer as _StaticLayer
except ImportError:  # pragma: no cover - 4.x
    _StaticLayer = None

# transformers 5.25 renamed the cache from `past_key_values` to `cache`: in forward arguments, in the mask factories'
# arguments and in output fields (the old names warn, and go in 5.40). We accept both names and speak to each
# transformers version in the name it declares.
_MASK_CACHE_ARG = "cache" if _V5_MASKS and "cache" in inspect.signature(create_causal_mask).parameters \
    else "past_key_values"
_OUTPUT_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) \
    else "past_key_values"


def _one_cache(past_key_values, cache):
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("got two caches: pass it once, as `cache=` (transformers >= 5.25) or `past_key_values=`")
    return cache if cache is not None else past_key_values

try:  # transformers >= 5 guards re-initialisation of loaded tensors through these
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - 4.x
    _init = nn.init

_MASKED_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")


def _is_compiling():
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _copy(param, values):
    """Initialise a tensor from values unless transformers already loaded it from a checkpoint."""
    if not getattr(param, "_is_hf_initialized", False):
        param.copy_(values.to(device=param.device, dtype=param.dtype))


def rms_norm(x, eps):
    """nanochat's norm: no learnable weight (pre-norm, QK-norm, embedding norm and final norm alike)."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary(x, cos, sin):
    """nanochat's rotary: half split, rotating by -theta (the transpose of the textbook convention; only relative
    rotations matter, kept for checkpoint compatibility). x: (B, H, T, D); cos/sin: (B, 1, T, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)


def repeat_kv(hidden_states, n_rep):
    batch, num_kv, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_kv, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_kv * n_rep, slen, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask[:, :, :, : key_states.shape[-2]]
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


_HAS_GET_INTERFACE = hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface")  # transformers >= 4.56


class NanoChatRotaryEmbedding(nn.Module):
    """cos/sin for the given positions. `inv_freq` is a non-persistent buffer: `_init_weights` recomputes it, since
    transformers 5 materializes such buffers as garbage after a meta-device load (HF_NOTES §2b)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.compute_inv_freq(config), persistent=False)

    @staticmethod
    def compute_inv_freq(config, device=None):
        hd = config.head_dim
        base = config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))

    @torch.no_grad()
    def forward(self, x, position_ids):
        # outer product positions x frequencies in fp32, exactly as nanochat precomputes its tables
        freqs = position_ids[:, None, :, None].float() * self.inv_freq.to(x.device)[None, None, None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.config.rope_bf16_tables:  # nanochat before 2026-03-04 kept the tables in bf16 even in fp32 runs
            cos, sin = cos.bfloat16(), sin.bfloat16()
        return cos.to(x.dtype), sin.to(x.dtype)


class NanoChatAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim ** -0.5  # nanochat uses the default softmax scale; the 1.2 acts on q and k
        self.is_causal = True
        # architecture constants, read once: a config attribute read goes through several __getattribute__ layers
        # (~1 us each), and a decode step made ~80 of them
        self.eps, self.qk_norm_scale = config.rms_norm_eps, config.qk_norm_scale
        self.ve_gate_channels, self.ve_gate_scale = config.ve_gate_channels, config.ve_gate_scale
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # ResFormer value residual: the gate reads the first few channels of the block's normalized input
        self.ve_gate = nn.Linear(config.ve_gate_channels, self.num_kv_heads, bias=False) \
            if layer_idx in config.value_embed_layers else None
        bound = _uniform_bound(config)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            _set_init(proj, "uniform", -bound, bound)
        _set_init(self.o_proj, "zeros")  # every block starts as the identity
        if self.ve_gate is not None:
            _set_init(self.ve_gate, "uniform", 0.0, 0.02)  # gates start slightly above neutral

    @property
    def sliding_window(self):
        """Keys a query sees, itself included (HF's convention; nanochat's window + 1), or None; read from the config
        so that a window changed on a live config reaches the attention too."""
        window = self.config.layer_window(self.layer_idx)
        return window + 1 if window >= 0 else None

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                value_embed=None, **kwargs):
        bsz, q_len, _ = hidden_states.shape
        shape = (bsz, q_len, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.ve_gate is not None:
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(hidden_states[..., : self.ve_gate_channels]))
            v = v + gate.transpose(1, 2).unsqueeze(-1) * value_embed.view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        # q and k take the same rotary, QK-norm (after RoPE: nanochat's order) and scale, all per head vector: one
        # pass over both, joined along the heads, is the same arithmetic in half the ops (decode is op-bound)
        qk = rms_norm(apply_rotary(torch.cat([q, k], dim=1), cos, sin), self.eps)
        if self.qk_norm_scale != 1.0:  # sharper attention, split between q and k
            qk = qk * self.qk_norm_scale
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        kwargs.pop("output_attentions", None)
        # transformers' own pattern, spelled out: vLLM's transformers backend finds the attention call by reading
        # this source for an assignment from ALL_ATTENTION_FUNCTIONS and exactly one call of that name
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl == "eager":
            attention_interface = eager_attention_forward
        elif _HAS_GET_INTERFACE:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        else:  # transformers 4.51 (TGI's pin)
            attention_interface = ALL_ATTENTION_FUNCTIONS[impl]
        # the masks carry the windows for the masked implementations; the others (flash, servers) take the window
        window = self.sliding_window if impl not in _MASKED_IMPLEMENTATIONS else None
        attn_output, attn_weights = attention_interface(
            self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.config.attention_dropout,
            scaling=self.scaling, sliding_window=window, **kwargs)
        attn_output = attn_output.reshape(bsz, q_len, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class NanoChatMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        bound = _uniform_bound(config)
        _set_init(self.fc1, "uniform", -0.4 * bound, 0.4 * bound)
        _set_init(self.fc2, "zeros")

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)).square())


class NanoChatDecoderLayer(_LayerBase):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.self_attn = NanoChatAttention(config, layer_idx)
        self.mlp = NanoChatMLP(config)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None,
                value_embed=None, **kwargs):
        attn_out, attn_weights = self.self_attn(rms_norm(hidden_states, self.eps), position_embeddings,
                                                attention_mask, past_key_values, value_embed=value_embed, **kwargs)
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(rms_norm(hidden_states, self.eps)), attn_weights


# ---------------------------------------------------------------------------------------------------------------
# Caches. The smear needs, at every decode step, the previous token's normalized (pre-smear) embedding, which no
# transformers cache holds (nanochat keeps it in `KVCache.prev_embedding`). Our caches carry it beside the keys and
# values, so every operation generate() applies to a cache (beam reorder, batch repeat/select, crop for assisted
# and prompt-lookup decoding, reset) moves it in step.


class NanoChatCache(DynamicCache):
    """A DynamicCache that also keeps the pre-smear normalized embedding of every cached token (B, T, hidden): the
    last one feeds the next decode step's smear, the others let `crop` rewind it. It costs hidden/(2 * layers *
    kv_dim) of the keys and values (~2.5% at d20). `generate()` builds this class for our model."""

    _smear = None  # (buffer (B, capacity, hidden), number of tokens held)

    @property
    def smear_history(self):
        return None if self._smear is None else self._smear[0][:, : self._smear[1]]

    @property
    def smear_state(self):
        """(B, 1, hidden): the last cached token's pre-smear embedding, or None before the first forward."""
        history = self.smear_history
        return None if history is None or history.shape[1] == 0 else history[:, -1:]

    def push_smear(self, x):
        x = x.detach()
        buf, n = self._smear if self._smear is not None else (None, 0)
        if buf is not None and (buf.shape[0] != x.shape[0] or buf.dtype != x.dtype):
            buf, n = None, 0  # a different batch or dtype: this forward starts the history afresh
        self._smear = _append_along(buf, n, x, dim=1)

    def _set_history(self, history):
        self._smear = None if history is None else (history, history.shape[1])

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        if self._smear is not None:
            self._set_history(self.smear_history.index_select(0, beam_idx.to(self._smear[0].device)))

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        if self._smear is not None:
            self._set_history(self.smear_history.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        if self._smear is not None:
            self._set_history(self.smear_history[indices])

    def crop(self, *args, **kwargs):
        # transformers <= 5.23 crop(max_length) and >= 5.25 crop(-tokens_to_remove): whichever it is, the history
        # follows the keys/values to the length they were cropped to
        super().crop(*args, **kwargs)
        if self._smear is not None:
            self._smear = (self._smear[0], min(self._smear[1], self.get_seq_length()))

    def reset(self):
        super().reset()
        self._smear = None


class NanoChatStaticCache(StaticCache):
    """transformers' StaticCache (preallocated, for torch.compile) plus the last token's pre-smear embedding in a
    buffer written in place, so a compiled decode step sees a fixed address. Static caches are not croppable, so
    only the last embedding is kept. `generate(cache_implementation="static")` builds this class for our model.

    Sliding-window layers get full-length static layers too (`_static_full_layers`): transformers' sliding static
    layer tracks its fill level in a Python int, which a compiled step guards on, so every decoded token would
    recompile. The window lives in the masks instead, and the cache holds what nanochat's KVCache holds."""

    smear_state = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _static_full_layers(self)

    def push_smear(self, x):
        last = x[:, -1:].detach()
        state = self.smear_state
        if state is None or state.shape != last.shape or state.dtype != last.dtype or state.device != last.device:
            # contiguous strides: a (1, 1, C) slice of a (1, T, C) prefill keeps stride T*C, which a compiled step
            # guards on, so every prompt length would compile anew
            self.smear_state = last.clone(memory_format=torch.contiguous_format)
        else:
            state.copy_(last)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        if self.smear_state is not None:
            self.smear_state.copy_(self.smear_state.index_select(0, beam_idx.to(self.smear_state.device)))

    def reset(self):
        super().reset()
        if self.smear_state is not None:
            self.smear_state.zero_()  # harmless: a sequence's first position never reads it


def _append_along(buf, n, new, dim):
    """Write `new` after the first `n` entries of `buf` along `dim`, in place, doubling `buf` when full (nanochat's
    KVCache writes in place too; concatenating copies everything every step). Returns (buffer, new length)."""
    t = new.shape[dim]
    if buf is None or n + t > buf.shape[dim] or buf.shape[:dim] != new.shape[:dim]:
        shape = list(new.shape)
        shape[dim] = max(2 * (n + t), 256)
        grown = new.new_empty(shape)
        if n:
            grown.narrow(dim, 0, n).copy_(buf.narrow(dim, 0, n))
        buf = grown
    buf.narrow(dim, n, t).copy_(new)
    return buf, n + t


# --- adapter: transformers' dynamic cache layers ------------------------------------------------------------------
# The only place that relies on fields of transformers' cache layers that are not public API (`keys`, `values`,
# `is_initialized`, `lazy_initialization`, `cumulative_length`, `sliding_window`, `record_past`). Our layers
# override `update` alone, to write into a preallocated buffer instead of concatenating (decode speed), and must
# give exactly what transformers' own layers give. tests/model/test_cache_adapter.py replays the same updates, crops and
# batch operations through both and fails loudly when a transformers release changes them; if the fields are
# missing, the plain layers are used (correct, only slower) and that test fails.

def _layer_fields_present():
    if not _V5_MASKS:
        return False
    try:
        probe = DynamicSlidingWindowLayer(sliding_window=4)
    except TypeError:
        return False
    return all(hasattr(probe, f) for f in ("keys", "values", "is_initialized", "lazy_initialization",
                                           "cumulative_length", "sliding_window"))


def _in_place_ok(layer):
    # writes into a buffer that an earlier view was saved from would break autograd: only without grad; and while
    # transformers records the past for a rollback (assisted decoding, 5.25+), its own update semantics apply
    return not torch.is_grad_enabled() and not getattr(layer, "record_past", False)


def _append_kv(layer, key_states, value_states):
    """Append to a layer's keys/values inside preallocated buffers; returns (buffer_k, buffer_v, start, end): the
    cached tokens are buffer[:, :, start:end]. Whenever something else replaced `layer.keys` (beam reorder, batch
    select, crop, reset) the buffers are rebuilt from it."""
    state = getattr(layer, "_nc_buffer", None)
    if state is not None and layer.keys is state[4]:
        kb, vb, start, end = state[:4]
    else:
        kb = vb = None
        start, end = 0, (layer.keys.shape[-2] if layer.keys is not None and layer.keys.dim() == 4 else 0)
        if end:  # rebuild from what the layer holds now
            kb, _ = _append_along(None, 0, layer.keys, dim=2)
            vb, _ = _append_along(None, 0, layer.values, dim=2)
    kb, _ = _append_along(kb[:, :, start:] if kb is not None and start else kb, end - start, key_states, dim=2)
    vb, end = _append_along(vb[:, :, start:] if vb is not None and start else vb, end - start, value_states, dim=2)
    return kb, vb, 0, end


IN_PLACE_CACHE_LAYERS = _layer_fields_present()

if IN_PLACE_CACHE_LAYERS:
    class _InPlaceLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not _in_place_ok(self):
                return super().update(key_states, value_states, *args, **kwargs)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            kb, vb, start, end = _append_kv(self, key_states, value_states)
            self.keys, self.values = kb[:, :, start:end], vb[:, :, start:end]
            self._nc_buffer = (kb, vb, start, end, self.keys)
            return self.keys, self.values

    class _InPlaceSlidingLayer(DynamicSlidingWindowLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not _in_place_ok(self):
                return super().update(key_states, value_states, *args, **kwargs)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.cumulative_length += key_states.shape[-2]
            kb, vb, start, end = _append_kv(self, key_states, value_states)
            full_k, full_v = kb[:, :, start:end], vb[:, :, start:end]
            start = max(start, end - (self.sliding_window - 1))  # keep the last window - 1 tokens, as transformers
            self.keys, self.values = kb[:, :, start:end], vb[:, :, start:end]
            self._nc_buffer = (kb, vb, start, end, self.keys)
            return full_k, full_v

    _IN_PLACE_LAYER_CLASSES = {DynamicLayer: _InPlaceLayer, DynamicSlidingWindowLayer: _InPlaceSlidingLayer}
else:
    _IN_PLACE_LAYER_CLASSES = {}


def _static_full_layers(cache):
    """Swap a static cache's not-yet-used sliding layers for full static layers of the cache's length (adapter:
    relies on `layers`, `is_sliding`, `is_initialized` and `max_cache_len` of transformers' static layers, checked by
    tests/generation/test_static_decode.py: no sliding layer left, one compiled graph for every decode step)."""
    layers = getattr(cache, "layers", None)
    if not layers or _StaticLayer is None:
        return cache
    length = max(getattr(layer, "max_cache_len", 0) for layer in layers)
    for i, layer in enumerate(layers):
        if getattr(layer, "is_sliding", False) and not getattr(layer, "is_initialized", True) and \
                type(layer).__name__ == "StaticSlidingWindowLayer":
            layers[i] = _StaticLayer(max_cache_len=length)
    return cache


def _adopt_cache(cache):
    """Give a cache that transformers built (generate(), `DynamicCache(config=...)`) our class, keeping everything
    it was set up with (layer kinds, windows, offloading, past recording). Our classes add no constructor state, so
    re-classing the object is exact across transformers versions, where their constructors differ. Caches of other
    classes (a user's quantized or offloaded one) are left as they are and get the smear state as an attribute."""
    if type(cache) is DynamicCache and cache.get_seq_length() == 0:
        cache.__class__ = NanoChatCache
        for layer in getattr(cache, "layers", ()):
            if type(layer) in _IN_PLACE_LAYER_CLASSES:
                layer.__class__ = _IN_PLACE_LAYER_CLASSES[type(layer)]
    elif type(cache) is StaticCache and cache.get_seq_length() == 0:
        cache.__class__ = NanoChatStaticCache
        _static_full_layers(cache)
    return cache


def _new_cache(config):
    # v5 caches read layer_types/sliding_window from the config and keep only the window on S layers
    return _adopt_cache(DynamicCache(config=config) if _V5_MASKS else DynamicCache())


class NanoChatPreTrainedModel(PreTrainedModel):
    config_class = NanoChatConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NanoChatDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True  # 4.x name
    _supports_flex_attn = True
    _supports_attention_backend = True  # vLLM/TGI check this to drive the model with their own attention
    _supports_cache_class = True
    # generate(cache_implementation="static") builds NanoChatStaticCache (smear state in a fixed buffer), and the
    # decode step compiles as one graph (tests/model/test_generation.py); on 4.x the static path is not wired
    _supports_static_cache = _V5_MASKS
    _can_compile_fullgraph = _V5_MASKS
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    # The two parameter roles the module tree cannot tell; modeling_nanochat/checkpoints/architecture.py derives
    # every other one (embeddings, head, block matrices, LoRA targets) from the modules, and the tools around the
    # model (optimizer groups, scaling counts, LoRA, 4/8-bit loading) read these from there. Stated here, next to
    # the parameters, so that a new one is classified where it is added:
    # - the optimizer group (nanochat's setup_optimizer) of each parameter or module the base model owns directly,
    #   outside the embeddings and the blocks, by attribute name;
    _nanochat_scalar_groups = {"resid_lambdas": "resid", "x0_lambdas": "x0", "smear_gate": "smear",
                               "smear_lambda": "smear", "backout_lambda": "smear"}
    # - Linear layers that gate a few channels instead of transforming the residual stream: too small for LoRA
    #   adapters or 4/8-bit quantization.
    _nanochat_gate_modules = ("smear_gate", "ve_gate")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """PreTrainedModel.from_pretrained; a truncated or corrupt weights file (safetensors raises its own
        `SafetensorError: incomplete metadata`, naming neither file nor fix) becomes an OSError that says both."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as e:
            if type(e).__name__ != "SafetensorError":  # by name: this file imports only torch and transformers
                raise
            raise OSError(f"cannot load the weights of {pretrained_model_name_or_path}: a safetensors file there is "
                          f"truncated or corrupt ({e}). Copy or download it again, or load an earlier checkpoint "
                          "of the same run.") from e

    @torch.no_grad()
    def _init_weights(self, module):
        """nanochat's init (reference §1.6). transformers calls this per module (leaves included) and, in v5, marks a
        module's tensors initialised right after, so each leaf carries its own rule (`_init_rule`, set where the
        leaf is created). Also recomputes non-persistent buffers, which a meta-device load leaves uninitialised."""
        rule = getattr(module, "_init_rule", None)
        if rule is not None:
            kind, a, b = rule
            if kind == "uniform":
                _init.uniform_(module.weight, a, b)
            elif kind == "normal":
                _init.normal_(module.weight, mean=a, std=b)
            else:
                _init.zeros_(module.weight)
        elif isinstance(module, NanoChatRotaryEmbedding):
            module.inv_freq.copy_(module.compute_inv_freq(self.config, device=module.inv_freq.device))
        elif isinstance(module, NanoChatModel):  # the scalars it owns directly
            n = self.config.num_hidden_layers
            steps = torch.arange(n, dtype=torch.float32) / max(n - 1, 1)
            if module.resid_lambdas is not None:
                _copy(module.resid_lambdas, 1.15 - 0.10 * steps)  # stronger residual early, weaker deep
                _copy(module.x0_lambdas, 0.20 - 0.15 * steps)  # more input-embedding blending early
            if module.smear_lambda is not None:
                _init.zeros_(module.smear_lambda)  # smear starts disabled
            if module.backout_lambda is not None:
                _init.constant_(module.backout_lambda, 0.2)


def _set_init(module, kind, a=0.0, b=0.0):
    """Record how nanochat initialises this leaf: ('uniform', lo, hi), ('normal', mean, std) or ('zeros',)."""
    module._init_rule = (kind, a, b)
    return module


def _uniform_bound(config):
    return 3 ** 0.5 * config.hidden_size ** -0.5  # uniform with the std of N(0, 1/d)


def add_outer_parameters(module, config):
    """The base model's parameters outside the token embedding and the blocks (value embeddings, resid/x0 lambdas,
    smear gate and lambda, backout lambda), under the names checkpoints store them by. One definition for every
    implementation that loads our weights by name (this model; the vLLM model in modeling_nanochat/engines)."""
    kv_dim = config.num_key_value_heads * config.head_dim
    module.value_embeds = nn.ModuleDict(
        {str(i): nn.Embedding(config.padded_vocab_size, kv_dim) for i in config.value_embed_layers})
    n = config.num_hidden_layers
    module.resid_lambdas = nn.Parameter(torch.ones(n)) if config.residual_lambdas else None
    module.x0_lambdas = nn.Parameter(torch.zeros(n)) if config.residual_lambdas else None
    module.smear_gate = nn.Linear(config.smear_channels, 1, bias=False) if config.smear else None
    module.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
    module.backout_lambda = nn.Parameter(torch.full((1,), 0.2)) if config.backout else None
    for emb in module.value_embeds.values():
        _set_init(emb, "uniform", -_uniform_bound(config), _uniform_bound(config))
    if module.smear_gate is not None:
        _set_init(module.smear_gate, "uniform", 0.0, 0.02)


class NanoChatHFModel(NanoChatPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NanoChatDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        add_outer_parameters(self, config)
        self.rotary_emb = NanoChatRotaryEmbedding(config)
        self.smear_channels = config.smear_channels
        _set_init(self.embed_tokens, "normal", 0.0, 0.8)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _smear(self, x, position_ids, attention_mask, past_key_values, cu_seq_lens=None, server_decode=False):
        """Mix the previous token's normalized embedding into each position (cheap bigram information).

        Unlike nanochat, which only ever sees one document-packed row, the previous token must belong to the same
        sequence: the smear restarts where position_ids restart (packed rows, flattened server batches), after
        padding, and at sequence starts given by `cu_seq_lens`. With plain arange positions and no padding this is
        exactly nanochat's behaviour (which smears across packed documents, as nanochat trains)."""
        lam = self.smear_lambda.to(x.dtype)
        gate = lam * torch.sigmoid(self.smear_gate(x[..., : self.smear_channels]))
        state = getattr(past_key_values, "smear_state", None) if past_key_values is not None else None
        if x.shape[1] == 1 and attention_mask is None and cu_seq_lens is None and not server_decode and \
                state is not None and state.shape[0] == x.shape[0] and getattr(past_key_values, "push_smear", None) \
                and not _is_compiling():
            # eager decode step (one token, no padding): the general path below builds the same thing from 8 ops;
            # a row whose position is 0 starts a new sequence and ignores the cached state
            cont = (position_ids.expand(x.shape[0], -1) > 0).unsqueeze(-1).to(x.dtype)
            out = x + cont * gate * state.to(x.dtype)
            past_key_values.push_smear(x)
            return out
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        pos = position_ids.expand(x.shape[0], -1)
        cont = torch.ones_like(pos, dtype=torch.bool)
        cont[:, 1:] = pos[:, 1:] == pos[:, :-1] + 1
        first_pos = pos[:, 0]
        if state is not None and state.shape[0] == x.shape[0]:
            prev[:, :1] = state.to(x.dtype)  # continuing a sequence: its previous token came from an earlier forward
            cont[:, 0] = first_pos > 0  # (a new sequence in a reused cache starts at position 0 and ignores it)
        else:
            cont[:, 0] = False
        if attention_mask is not None and attention_mask.dim() == 2:  # covers past + current tokens
            seen = F.pad(attention_mask.bool(), (1, 0))  # a leading False: nothing precedes the first token
            cont = cont & seen[:, -x.shape[1]:] & seen[:, -x.shape[1] - 1: -1]  # this token and the one before
        if cu_seq_lens is not None:  # varlen batches (flash attention / TGI prefill): starts of sequences
            starts = cu_seq_lens[:-1].long()
            starts = starts[starts < x.shape[1]]
            cont[:, starts] = False
        elif server_decode:  # TGI decode: one token per sequence, the previous token is not available here
            cont[:] = False
        if past_key_values is not None:
            push = getattr(past_key_values, "push_smear", None)
            if push is not None:
                push(x)
            else:  # a cache class of transformers' own that a user built: the last token only (no crop, no beams)
                past_key_values.smear_state = x[:, -1:].detach()
        return x + cont.unsqueeze(-1).to(x.dtype) * gate * prev

    def _masks(self, x, attention_mask, position_ids, cache):
        """One mask per window kind. Sliding layers use transformers' sliding-window factory (it knows sliding
        caches); full layers are plain causal until the sequence may outgrow nanochat's long window."""
        cfg = self.config
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        kinds = set(cfg.layer_types)
        past_seen = _cached_length(cache)
        if x.shape[1] == 1 and attention_mask is None and impl in ("eager", "sdpa") and past_seen is not None and \
                all(past_seen <= w for w in (cfg.short_window, cfg.long_window) if w >= 0):
            # one query, no padding, every cached key inside both windows: nothing to mask (the decode steps of a
            # chat before it outgrows the short window), and building the masks costs more than the step's attention
            return dict.fromkeys(kinds)
        # a preallocated cache (static) may hold more than the long window: add the window's bound (a no-op while
        # shorter) rather than read a length that compiled code cannot branch on
        long_limit = cfg.long_window >= 0 and (past_seen is None or past_seen + x.shape[1] > cfg.long_window + 1)
        if _V5_MASKS:
            kw = {"config": cfg, "inputs_embeds": x, "attention_mask": attention_mask, "position_ids": position_ids,
                  _MASK_CACHE_ARG: cache}
            masks = {}
            if "full_attention" in kinds:
                extra = {"and_mask_function": sliding_window_overlay(cfg.long_window + 1)} if long_limit else {}
                masks["full_attention"] = create_causal_mask(**kw, **extra)
            if "sliding_attention" in kinds:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
            return masks
        if impl not in _MASKED_IMPLEMENTATIONS:  # server-managed attention (tgi, flash): no dense mask needed
            return {k: attention_mask for k in kinds}
        return {kind: _dense_mask(x, attention_mask, position_ids, past_seen or 0, cache is None,
                                  cfg.short_window + 1 if kind == "sliding_attention" else
                                  (cfg.long_window + 1 if long_limit else None)) for kind in kinds}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None, cache=None,
                output_attentions=None, **kwargs):
        cache = _one_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is None and self.config.value_embed_layers:
            raise ValueError("this model's value embeddings are looked up by token id (nanochat's value residual), "
                             "so it needs input_ids; inputs_embeds alone cannot drive it")
        # A clear error for ids from the wrong tokenizer. Only on CPU: on an accelerator the check would cost a host
        # sync per decode step (there the embedding's own device assert fires instead).
        if input_ids is not None and input_ids.device.type == "cpu" and input_ids.numel() and \
                not _is_compiling() and int(input_ids.max()) >= self.config.padded_vocab_size:
            raise ValueError(f"token id {int(input_ids.max())} is outside the vocabulary "
                             f"({self.config.vocab_size}); was this model paired with the right tokenizer?")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else \
            self.config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else \
            getattr(self.config, "output_attentions", False)
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if output_attentions and impl != "eager":
            raise ValueError(f"output_attentions=True needs the eager attention: attn_implementation={impl!r} "
                             "does not return attention weights. Load with attn_implementation='eager' or set "
                             "model.config._attn_implementation = 'eager'")
        kwargs.pop("cache_position", None)  # transformers 4.x passes it; positions come from position_ids
        if use_cache and cache is None:
            cache = _new_cache(self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        plain = position_ids is None and attention_mask is None and cache is None  # one unpadded sequence per row
        if position_ids is None:
            position_ids = _next_positions(inputs_embeds, cache)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)

        x = rms_norm(inputs_embeds, self.config.rms_norm_eps)  # norm right after the embedding
        # generate() with a compilable cache hands over ready masks, one per layer type (create_masks_for_generate)
        ready_masks = attention_mask if isinstance(attention_mask, dict) else None
        if self.smear_gate is not None:
            # TGI passes its paged cache as `kv_cache` and `cu_seqlen_prefill=None` on decode steps
            server_decode = "kv_cache" in kwargs and kwargs.get("cu_seqlen_prefill") is None
            x = self._smear(x, position_ids, None if ready_masks is not None else attention_mask, cache,
                            kwargs.get("cu_seq_lens_q", kwargs.get("cu_seqlen_prefill")), server_decode)
        if ready_masks is not None:
            masks = ready_masks
        elif plain and not self.training and getattr(self.config, "_attn_implementation", None) == "sdpa":
            masks = _window_masks(self.config, x)
        else:
            masks = self._masks(x, attention_mask, position_ids, cache)
        position_embeddings = self.rotary_emb(x, position_ids)

        x0 = x
        x_backout = None
        layer_types, backout_layer = self.config.layer_types, self.config.backout_layer  # read once per forward
        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        if self.resid_lambdas is not None:  # one cast and split per forward, not an index and a cast per layer
            resid, mix = self.resid_lambdas.to(x.dtype).unbind(0), self.x0_lambdas.to(x.dtype).unbind(0)
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden += (x,)
            if self.resid_lambdas is not None:  # applied before every block, including the first
                x = resid[i] * x + mix[i] * x0
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if str(i) in self.value_embeds else None
            x, attn_weights = layer(x, masks[layer_types[i]], position_embeddings, cache,
                                    value_embed=ve, position_ids=position_ids, **kwargs)
            if all_attentions is not None:
                all_attentions += (attn_weights,)
            if i == backout_layer:
                x_backout = x
        if self.backout_lambda is not None:  # remove low-level features cached at mid depth
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = rms_norm(x, self.config.rms_norm_eps)
        if all_hidden is not None:
            all_hidden += (x,)
        if return_dict is False:  # what ModelOutput.to_tuple() gives, without building the output object first
            return _tuple(x, cache if use_cache else None, all_hidden, all_attentions)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=all_hidden, attentions=all_attentions,
                                       **{_OUTPUT_CACHE_FIELD: cache if use_cache else None})


def _flag(value, default):
    return default if value is None else value


def _tuple(*fields):
    """A model output as a tuple: its fields in order, the None ones left out (``ModelOutput.to_tuple``)."""
    return tuple(f for f in fields if f is not None)


def _window_masks(config, x):
    """Masks for rows that are each one whole sequence from position 0 (scoring, evaluation): None where the causal
    fast path of SDPA suffices (the sequence fits the window), else one additive (T, T) mask shared by the batch and
    by every layer of that window. transformers' factory builds a (B, 1, T, T) boolean mask that SDPA converts per
    layer; for a 10-shot CORE batch that conversion and the wider mask took more time than the attention itself."""
    t = x.shape[1]
    idx = torch.arange(t, device=x.device)
    masks = {}
    for kind in set(config.layer_types):
        window = config.short_window if kind == "sliding_attention" else config.long_window
        if window < 0 or t <= window + 1:
            masks[kind] = None
        else:
            allowed = (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] <= window)
            masks[kind] = torch.zeros(t, t, dtype=x.dtype, device=x.device).masked_fill_(
                ~allowed, torch.finfo(x.dtype).min)[None, None]
    return masks


def _next_positions(x, cache):
    """(1, T) positions of x's tokens after what the cache holds (a static cache's length is a tensor: added, never
    read into Python)."""
    past_seen = cache.get_seq_length() if cache is not None else 0
    return (torch.arange(x.shape[1], device=x.device) + past_seen).unsqueeze(0)


def _cached_length(cache):
    """Tokens a cache holds, or None for a preallocated (compilable) cache, whose length is a tensor that compiled
    code must not turn into a Python number; callers then rely on position_ids."""
    if cache is None:
        return 0
    if getattr(cache, "is_compileable", False):
        return None
    return cache.get_seq_length()


def _dense_mask(x, attention_mask, position_ids, past_seen, no_cache, window):
    """Boolean (B, 1, q, kv) mask for transformers 4.x, which lacks the v5 mask factories: causal, optional sliding
    window (keys counted including the query), padding, and packed sequences from restarting position_ids."""
    bsz, q_len = x.shape[:2]
    kv_len = past_seen + q_len
    q_pos = torch.arange(past_seen, kv_len, device=x.device)[:, None]
    k_pos = torch.arange(kv_len, device=x.device)[None, :]
    allowed = (k_pos <= q_pos)[None].expand(bsz, -1, -1)
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)[None]
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask[:, None, -kv_len:].bool()
    if no_cache:
        pos = position_ids.expand(bsz, -1)
        seq = torch.cat([torch.zeros_like(pos[:, :1]), (pos[:, 1:] != pos[:, :-1] + 1).long()], 1).cumsum(1)
        allowed = allowed & (seq[:, :, None] == seq[:, None, :])
    # a fully masked row (left padding queries) would give NaNs: let it see itself
    allowed = allowed | (~allowed.any(-1, keepdim=True) & (k_pos == q_pos)[None])
    return allowed[:, None]


class NanoChatHFForCausalLM(NanoChatPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config):
        super().__init__(config)
        self.model = NanoChatModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = _set_init(nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False), "normal", 0.0, 0.001)
        self.post_init()
        if getattr(self, "generation_config", None) is not None:
            # a chat turn ends at <|assistant_end|>; <|bos|> starts a new document (nanochat's Engine stops on both)
            self.generation_config.eos_token_id = _stop_ids(config.eos_token_id, config.bos_token_id)
            self.generation_config.pad_token_id = config.pad_token_id
            self.generation_config.bos_token_id = config.bos_token_id

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _prepare_cache_for_generation(self, *args, **kwargs):
        """Let generate() build its usual cache (dynamic, static, ...), then give it our class, which carries the
        smear state through beam search, batch expansion and cropping. The cache sits in `model_kwargs` under
        `cache` (transformers >= 5.25) or `past_key_values` (before)."""
        out = super()._prepare_cache_for_generation(*args, **kwargs)
        model_kwargs = kwargs.get("model_kwargs", args[1] if len(args) > 1 else None)
        if isinstance(model_kwargs, dict):
            for name in ("cache", "past_key_values"):
                if model_kwargs.get(name) is not None:
                    _adopt_cache(model_kwargs[name])
        return out

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, position_ids=None, **kwargs):
        """generate() builds the masks ahead of a compiled decode step (compilable caches): ours, with nanochat's
        long-window bound on full layers, not transformers' generic ones."""
        cache = _one_cache(kwargs.get("past_key_values"), kwargs.get("cache"))
        if position_ids is None:
            position_ids = _next_positions(inputs_embeds, cache)
        return self.model._masks(inputs_embeds, attention_mask, position_ids, cache)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, return_dict=None, cache=None,
                **kwargs):
        # the base model answers in a tuple unless hidden states or attentions are asked for: building two output
        # objects per decode step is a measurable share of a small model's step (see `return_dict` below)
        extras = _flag(kwargs.get("output_hidden_states"), self.config.output_hidden_states) or \
            _flag(kwargs.get("output_attentions"), getattr(self.config, "output_attentions", False))
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=_one_cache(past_key_values, cache), inputs_embeds=inputs_embeds,
                             use_cache=use_cache, return_dict=bool(extras), **kwargs)
        if extras:
            hidden, out_cache = outputs.last_hidden_state, getattr(outputs, _OUTPUT_CACHE_FIELD)
            hidden_states, attentions = outputs.hidden_states, outputs.attentions
        else:  # (hidden,) or (hidden, cache)
            hidden, out_cache, hidden_states, attentions = outputs[0], outputs[1] if len(outputs) > 1 else None, \
                None, None
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])[..., : self.config.vocab_size]  # drop vocab padding
        logits = logits.float()  # nanochat: fp32 before the softcap and the loss
        cap = self.config.final_logit_softcapping
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:  # shift_labels: targets already shifted
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if return_dict is False:  # loops that feed the cache back by hand (generation/tool_use.py) ask for this
            return _tuple(loss, logits, out_cache, hidden_states, attentions)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions,
                                      **{_OUTPUT_CACHE_FIELD: out_cache})


def _stop_ids(*ids):
    """generate()'s stop ids: each given id or list of ids, flattened, without None or repeats (None if empty)."""
    flat = []
    for i in ids:
        for j in (i if isinstance(i, (list, tuple)) else [i]):
            if j is not None and j not in flat:
                flat.append(int(j))
    return flat or None


# transformers ships its own NanoChatModel/NanoChatForCausalLM (model_type "nanochat", a different architecture).
# config.json's "architectures" holds the class name, and some loaders resolve that name inside transformers before
# trying auto_map (TRL's create_model_from_path: getattr(transformers, architectures[0])), so our classes carry
# distinct names; the short names stay importable (and resolvable in the remote-code module for older auto_maps).
NanoChatModel = NanoChatHFModel
NanoChatForCausalLM = NanoChatHFForCausalLM

NanoChatConfig.register_for_auto_class()
NanoChatHFModel.register_for_auto_class("AutoModel")
NanoChatHFForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["NanoChatPreTrainedModel", "NanoChatHFModel", "NanoChatHFForCausalLM", "NanoChatModel", "NanoChatForCausalLM",
           "NanoChatCache"]

"""NanoChat configuration: nanochat's one dial (`depth`) plus one field per architecture change.

This file is saved next to every checkpoint and loaded as remote code, so it imports only torch/transformers.
It must import and run under transformers 4.51 (TGI's pin) as well as 5.x.

Sizing rule (nanochat `base_train.py`): width = ceil(depth * aspect_ratio / head_dim) * head_dim, heads =
width / head_dim, KV heads = heads, MLP = 4 * width. Every feature nanochat added over time (RoPE base, QK scale,
value embeddings and their gate, logit softcap, norm eps, lambdas, sliding windows, smear, backout, bf16 rotary
tables) is its own field, so checkpoints of every era — including transformers' own Oct-2025 `nanochat` — are this
one class with other settings (see `ARCHITECTURE_ERAS`).
"""

import math

try:  # transformers >= 5 spells it PreTrainedConfig; PretrainedConfig stays an alias there and exists in 4.x
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

# F.rms_norm(x, eps=None) uses float32 machine epsilon (also for bf16 input: it computes in fp32). nanochat relies
# on that default; we store the number explicitly because servers read `rms_norm_eps`. Not 1e-6 (that is the
# Oct-2025 transformers port's choice, kept only for checkpoints converted from it).
NANOCHAT_RMS_NORM_EPS = 1.1920928955078125e-07
NANOCHAT_SPECIAL_TOKENS = 9  # <|bos|> ... <|output_end|> are the last 9 ids of a nanochat vocabulary

WINDOW_RULES = ("quarter_128", "third_128", "half")
AUTO_MAP = {
    "AutoConfig": "configuration_nanochat.NanoChatConfig",
    "AutoModel": "modeling_nanochat.NanoChatHFModel",
    "AutoModelForCausalLM": "modeling_nanochat.NanoChatHFForCausalLM",
}


def short_window_for(sequence_len: int, rule: str = "quarter_128") -> int:
    """Left window (tokens before the query) of an 'S' layer, by the rule of each nanochat era."""
    if rule == "quarter_128":  # 2026-03-14 onwards: ceil(T/4) rounded up to FA3's 128 tile (T=2048 -> 512)
        return -(-sequence_len // 4 // 128) * 128
    if rule == "third_128":  # 2026-03-09 .. 03-13
        return -(-sequence_len // 3 // 128) * 128
    if rule == "half":  # 2026-01-11 .. 03-08
        return sequence_len // 2
    raise ValueError(f"unknown short-window rule {rule!r}; choose one of {WINDOW_RULES}")


def alternating_value_embed_layers(num_layers: int) -> list[int]:
    """nanochat's `has_ve`: every other layer, the last one always included."""
    return [i for i in range(num_layers) if i % 2 == (num_layers - 1) % 2]


# Each era is the set of field values nanochat's gpt.py had between two commits, written as the previous era plus
# what changed. A `None` window rule means full causal attention everywhere (no windows existed yet). The converter
# infers the era from a checkpoint's keys where that is unambiguous. Dates are nanochat commit dates.
_ERA_2025_10 = dict(  # 3a5e0bc (initial) .. 2026-01-10: pre-norm GPT, QK-norm, ReLU^2, untied head, bf16 rotary tables
    rope_theta=10_000.0, qk_norm_scale=1.0, final_logit_softcapping=15.0, residual_lambdas=False, value_embeds=False,
    smear=False, backout=False, window_rule=None, rope_bf16_tables=True)
_ERA_2026_01 = {**_ERA_2025_10, **dict(  # aa530cd/fbc1484/e85db6b (01-11..16): lambdas, S/L windows, value embeds
    residual_lambdas=True, value_embeds=True, ve_gate_channels=32, ve_gate_scale=2.0, window_rule="half")}
_ERA_2026_03_02 = {**_ERA_2026_01, **dict(  # aba30cb/1076f97 (03-02..08): softcap 20; tables follow compute dtype
    # (from 1076f97 on 03-04; a 03-02/03 checkpoint rounds them to bf16: set rope_bf16_tables=True for it)
    final_logit_softcapping=20.0, rope_bf16_tables=False)}
_ERA_2026_03_09 = {**_ERA_2026_03_02, **dict(  # 6ed7d1d (03-09..13): RoPE 100k, QK x1.15, 12-ch x3 gate, S = T/3
    rope_theta=100_000.0, qk_norm_scale=1.15, final_logit_softcapping=15.0, ve_gate_channels=12, ve_gate_scale=3.0,
    window_rule="third_128")}
_ERA_2026_03_14 = {**_ERA_2026_03_09, **dict(  # a825e63 (03-14) .. HEAD 92d63d4: smear, backout, QK x1.2, S = T/4
    smear=True, backout=True, qk_norm_scale=1.2, window_rule="quarter_128")}
ARCHITECTURE_ERAS = {"2025-10": _ERA_2025_10, "2026-01": _ERA_2026_01, "2026-03-02": _ERA_2026_03_02,
                     "2026-03-09": _ERA_2026_03_09, "2026-03-14": _ERA_2026_03_14}
ARCHITECTURE_ERAS["current"] = ARCHITECTURE_ERAS["2026-03-14"]


def _num_layers(depth, num_hidden_layers) -> int:
    """`depth` (nanochat's name) or `num_hidden_layers` (HF's): the same number, 12 when neither is given."""
    if depth is not None and num_hidden_layers is not None and depth != num_hidden_layers:
        raise ValueError(f"depth={depth} and num_hidden_layers={num_hidden_layers} disagree; give one of them")
    num_layers = num_hidden_layers if num_hidden_layers is not None else depth
    if num_layers is None:
        num_layers = 12
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"depth must be a positive integer, got {num_layers!r}")
    return num_layers


def _special_ids(vocab_size, bos_token_id, eos_token_id, pad_token_id) -> tuple:
    """A nanochat vocabulary ends with its 9 special tokens (§4), <|bos|> first; nanochat pads with <|bos|> and
    masks it."""
    if bos_token_id is None:
        bos_token_id = vocab_size - NANOCHAT_SPECIAL_TOKENS
    if eos_token_id is None:
        eos_token_id = vocab_size - NANOCHAT_SPECIAL_TOKENS + 4  # <|assistant_end|>
    if pad_token_id is None:
        pad_token_id = bos_token_id
    return bos_token_id, eos_token_id, pad_token_id


def _plain_rope(rope_theta, rope_parameters, rope_scaling) -> dict:
    """The one RoPE setting nanochat has, as transformers 5 spells it, from 5.x's `rope_parameters` or 4.x's
    `rope_theta` / `rope_scaling`."""
    # RoPE: transformers 5 keeps the base in `rope_parameters`; 4.x reads `rope_theta`. Keep both in sync.
    # nanochat has no RoPE scaling; a scaled type would need its own frequencies, so it is refused here rather
    # than silently ignored (4.x spelled it `rope_scaling`).
    if rope_scaling:
        rope_parameters = {**(rope_parameters or {}), **rope_scaling}
        rope_parameters.setdefault("rope_type", rope_parameters.pop("type", "default"))
    if rope_parameters is not None and rope_theta is not None and \
            float(rope_parameters.get("rope_theta", rope_theta)) != float(rope_theta):
        raise ValueError(f"rope_theta={rope_theta} disagrees with rope_parameters={rope_parameters}")
    if rope_theta is None:
        rope_theta = (rope_parameters or {}).get("rope_theta", 100_000.0)
    if rope_parameters is not None and rope_parameters.get("rope_type", rope_parameters.get("type", "default")) \
            != "default":
        raise ValueError(f"RoPE scaling is not supported (nanochat trains plain RoPE): got {rope_parameters}. "
                         "For a longer context, fine-tune with a larger max_position_embeddings (and windows), "
                         "or change rope_theta")
    return {"rope_type": "default", "rope_theta": float(rope_theta)}


class NanoChatConfig(_BaseConfig):
    r"""
    Configuration of a nanochat model. `NanoChatConfig(depth=20)` gives nanochat's d20; every derived size can also
    be given explicitly (then it is checked against the others).

    Args:
        depth (`int`): number of transformer blocks (alias of `num_hidden_layers`), nanochat's single dial.
        aspect_ratio (`int`, defaults to 64): width per layer before rounding to a multiple of `head_dim`.
        head_dim (`int`, defaults to 128): attention head size.
        hidden_size, num_attention_heads, num_key_value_heads, intermediate_size: derived from depth when omitted.
        vocab_size (`int`, defaults to 32768): real vocabulary; embeddings/head are padded to `pad_vocab_size_to`.
        max_position_embeddings (`int`, defaults to 2048): nanochat's `sequence_len` (training context; it also
            sizes the windows).
        window_pattern (`str` or `None`, defaults to "SSSL"): per-layer S/L letters tiled over the layers, the last
            layer always L. `None` = full causal attention everywhere (the 2025 models).
        short_window / long_window (`int`): left window in tokens (keys before the query, nanochat/FA3 semantics:
            a query sees `window + 1` keys). Derived from `max_position_embeddings` when omitted; `long_window=-1`
            means unlimited.
        value_embed_layers (`list[int]`): layers with a value embedding (default: nanochat's alternating rule).
        ve_gate_channels / ve_gate_scale: value-embedding gate input width and output range.
        residual_lambdas (`bool`): per-layer `resid_lambdas`/`x0_lambdas`.
        smear (`bool`), smear_channels (`int`): previous-token mixing of the normalized embedding.
        backout (`bool`): subtract `backout_lambda` x (residual after block depth//2) before the final norm.
        qk_norm_scale (`float`): multiplier on q and k after QK-norm (1.2 at HEAD).
        final_logit_softcapping (`float`): `c * tanh(logits / c)` in fp32 after the head.
        rms_norm_eps (`float`): eps of every (weightless) RMSNorm.
        rope_theta (`float`) / rope_parameters (`dict`): RoPE base.
        rope_bf16_tables (`bool`): round cos/sin tables to bf16 (nanochat before 2026-03-04 always did).
    """

    model_type = "nanochat_hf"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"depth": "num_hidden_layers", "sequence_len": "max_position_embeddings"}

    def __init__(
        self,
        depth=None,
        num_hidden_layers=None,
        aspect_ratio=64,
        head_dim=None,
        hidden_size=None,
        num_attention_heads=None,
        num_key_value_heads=None,
        intermediate_size=None,
        vocab_size=32768,
        pad_vocab_size_to=64,
        max_position_embeddings=2048,
        window_pattern="SSSL",
        short_window=None,
        long_window=None,
        value_embeds=True,
        value_embed_layers=None,
        ve_gate_channels=12,
        ve_gate_scale=3.0,
        residual_lambdas=True,
        smear=True,
        smear_channels=24,
        backout=True,
        qk_norm_scale=1.2,
        final_logit_softcapping=15.0,
        rms_norm_eps=NANOCHAT_RMS_NORM_EPS,
        rope_theta=None,
        rope_parameters=None,
        rope_bf16_tables=False,
        hidden_act="relu2",
        attention_bias=False,
        attention_dropout=0.0,
        use_cache=True,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        layer_types=None,
        sliding_window=None,
        **kwargs,
    ):
        # Keys only written for servers/readers; they are re-derived below and checked for consistency.
        for derived in ("padded_vocab_size", "backout_layer", "use_sliding_window"):
            kwargs.pop(derived, None)
        self._set_sizes(_num_layers(depth, num_hidden_layers), aspect_ratio, head_dim, hidden_size,
                        num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, pad_vocab_size_to,
                        max_position_embeddings)
        self._set_windows(window_pattern, short_window, long_window, layer_types, sliding_window)
        self._set_value_embeds(value_embeds, value_embed_layers, ve_gate_channels, ve_gate_scale)
        self.residual_lambdas = bool(residual_lambdas)
        self.smear = bool(smear)
        self.smear_channels = smear_channels
        if smear and smear_channels > self.hidden_size:
            raise ValueError(f"smear_channels={smear_channels} exceeds hidden_size={self.hidden_size}")
        self.backout = bool(backout)
        self.qk_norm_scale = float(qk_norm_scale)
        self.final_logit_softcapping = final_logit_softcapping
        self.rms_norm_eps = float(rms_norm_eps)

        self.rope_parameters = _plain_rope(rope_theta, rope_parameters, kwargs.pop("rope_scaling", None))
        self.rope_bf16_tables = bool(rope_bf16_tables)

        self.hidden_act = hidden_act
        if hidden_act != "relu2":
            raise ValueError(f"hidden_act={hidden_act!r}: nanochat's MLP is ReLU^2 ('relu2')")
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.use_cache = use_cache

        bos_token_id, eos_token_id, pad_token_id = _special_ids(vocab_size, bos_token_id, eos_token_id, pad_token_id)
        # Every save (ours, Trainer's, TRL's) must name all three Auto classes: vLLM needs AutoModel, and a plain
        # save_pretrained of the CausalLM would write only AutoConfig/AutoModelForCausalLM.
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        if self.tie_word_embeddings:
            raise ValueError("nanochat unties wte and lm_head; tie_word_embeddings must be False")

    def _set_sizes(self, num_layers, aspect_ratio, head_dim, hidden_size, num_attention_heads, num_key_value_heads,
                   intermediate_size, vocab_size, pad_vocab_size_to, max_position_embeddings):
        # --- sizes: the depth dial, unless given explicitly -------------------------------------------------
        for name, value in (("aspect_ratio", aspect_ratio), ("head_dim", head_dim), ("hidden_size", hidden_size),
                            ("num_attention_heads", num_attention_heads), ("num_key_value_heads", num_key_value_heads),
                            ("max_position_embeddings", max_position_embeddings), ("vocab_size", vocab_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if hidden_size is None:
            hd = head_dim if head_dim is not None else 128
            hidden_size = math.ceil(num_layers * aspect_ratio / hd) * hd  # nudge width up to a multiple of head_dim
        if head_dim is None:
            head_dim = hidden_size // num_attention_heads if num_attention_heads else min(128, hidden_size)
        if num_attention_heads is None:
            num_attention_heads = hidden_size // head_dim
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads  # nanochat trains MHA
        if intermediate_size is None:
            intermediate_size = 4 * hidden_size
        if num_attention_heads * head_dim != hidden_size:
            raise ValueError(
                f"hidden_size={hidden_size} must equal num_attention_heads*head_dim={num_attention_heads}*{head_dim} "
                "(nanochat ties head_dim = width / heads); change one of them or give only depth")
        if num_attention_heads % num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads={num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={num_key_value_heads} (grouped-query attention)")
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")

        self.aspect_ratio = aspect_ratio
        self.num_hidden_layers = num_layers
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.vocab_size = vocab_size
        self.pad_vocab_size_to = pad_vocab_size_to
        self.max_position_embeddings = max_position_embeddings

    def _set_windows(self, window_pattern, short_window, long_window, layer_types, sliding_window):
        num_layers, max_position_embeddings = self.num_hidden_layers, self.max_position_embeddings
        # --- attention windows --------------------------------------------------------------------------
        if window_pattern is not None:
            window_pattern = window_pattern.upper()
            if not window_pattern or any(c not in "SL" for c in window_pattern):
                raise ValueError(f"window_pattern={window_pattern!r} may contain only 'S' (short) and 'L' (long)")
        self.window_pattern = window_pattern
        if window_pattern is None:
            short_window = -1 if short_window is None else short_window
            long_window = -1 if long_window is None else long_window
        else:
            short_window = short_window_for(max_position_embeddings) if short_window is None else short_window
            long_window = max_position_embeddings if long_window is None else long_window
        self.short_window = int(short_window)
        self.long_window = int(long_window)
        derived_types = self._derive_layer_types()
        if layer_types is not None and list(layer_types) != derived_types:
            raise ValueError(f"layer_types={layer_types} does not match window_pattern={window_pattern!r} over "
                             f"{num_layers} layers ({derived_types}); drop layer_types, it is derived")
        self.layer_types = derived_types
        # `sliding_window` (HF's name, which servers read) is derived from short_window: one source of truth
        if sliding_window is not None and self.sliding_window is not None and sliding_window != self.sliding_window:
            raise ValueError(f"sliding_window={sliding_window} disagrees with short_window={self.short_window} "
                             f"(HF sliding_window = short_window + 1); drop sliding_window, it is derived")

    def _set_value_embeds(self, value_embeds, value_embed_layers, ve_gate_channels, ve_gate_scale):
        num_layers, hidden_size = self.num_hidden_layers, self.hidden_size
        # --- value embeddings --------------------------------------------------------------------------------
        if not value_embeds:
            value_embed_layers = []
        elif value_embed_layers is None:
            value_embed_layers = alternating_value_embed_layers(num_layers)
        value_embed_layers = sorted(int(i) for i in value_embed_layers)
        if any(i < 0 or i >= num_layers for i in value_embed_layers):
            raise ValueError(f"value_embed_layers={value_embed_layers} has a layer outside 0..{num_layers - 1}")
        self.value_embeds = bool(value_embed_layers)
        self.value_embed_layers = value_embed_layers
        self.ve_gate_channels = ve_gate_channels
        self.ve_gate_scale = float(ve_gate_scale)
        if value_embed_layers and ve_gate_channels > hidden_size:
            raise ValueError(f"ve_gate_channels={ve_gate_channels} exceeds hidden_size={hidden_size}")

    # transformers 4.x reads config.rope_theta; 5.x raises on it for its own configs but ours may keep it. Servers
    # (vLLM) also set it, so it has a setter that keeps rope_parameters in step.
    @property
    def rope_theta(self):
        return self.rope_parameters["rope_theta"]

    @rope_theta.setter
    def rope_theta(self, value):
        self.rope_parameters = {**getattr(self, "rope_parameters", {"rope_type": "default"}), "rope_theta": float(value)}

    @property
    def sliding_window(self):
        """Keys an S-layer query sees, itself included (HF's convention: short_window + 1); None without S layers."""
        if "sliding_attention" not in getattr(self, "layer_types", ()):
            return None
        return self.short_window + 1

    @sliding_window.setter
    def sliding_window(self, value):
        # transformers' base config sets sliding_window=None on its own: not a change of window
        if value is None and "sliding_attention" not in getattr(self, "layer_types", ()) or \
                not hasattr(self, "short_window"):
            return
        if value is None or int(value) < 1:
            raise ValueError(f"sliding_window={value!r}: an S layer sees at least itself (>= 1); to drop the "
                             "windows use window_pattern=None")
        self.short_window = int(value) - 1

    def to_dict(self):
        out = super().to_dict()
        out["sliding_window"] = self.sliding_window  # a property: written for servers, checked on load
        return out

    @property
    def padded_vocab_size(self):
        m = self.pad_vocab_size_to or 1
        return -(-self.vocab_size // m) * m

    @property
    def backout_layer(self):
        return self.num_hidden_layers // 2

    def _derive_layer_types(self):
        if self.window_pattern is None:
            return ["full_attention"] * self.num_hidden_layers
        p = self.window_pattern
        letters = [p[i % len(p)] for i in range(self.num_hidden_layers)]
        letters[-1] = "L"  # nanochat forces full context on the final layer
        return ["sliding_attention" if c == "S" else "full_attention" for c in letters]

    def layer_window(self, layer_idx):
        """Left window (nanochat semantics; -1 = unlimited) of one layer."""
        if self.layer_types[layer_idx] == "sliding_attention":
            return self.short_window
        return self.long_window

    @classmethod
    def for_era(cls, era, **kwargs):
        """A config with the architecture switches of one nanochat era (see ARCHITECTURE_ERAS)."""
        if era not in ARCHITECTURE_ERAS:
            raise ValueError(f"unknown architecture era {era!r}; choose one of {sorted(ARCHITECTURE_ERAS)}")
        settings = dict(ARCHITECTURE_ERAS[era])
        rule = settings.pop("window_rule")
        seq = kwargs.get("max_position_embeddings", 2048)
        if rule is None:
            settings.update(window_pattern=None)
        else:
            settings.setdefault("short_window", short_window_for(seq, rule))
        settings.update(kwargs)
        return cls(**settings)


__all__ = ["NanoChatConfig", "ARCHITECTURE_ERAS", "short_window_for", "alternating_value_embed_layers"]

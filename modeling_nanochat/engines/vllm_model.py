"""nanochat in vLLM's model API: the same computation as `NanoChatHFForCausalLM`, on vLLM's paged KV cache.

Through vLLM's transformers backend our HF model loses the smear at every decode step: the engine hands the model
one token per sequence and keeps the previous tokens only as keys and values in its paged cache, so the previous
token's embedding is gone. Here the smear reads it from that cache too: one extra attention layer (`SmearAttention`)
stores each token's normalized embedding as its *value* and selects the previous token exactly (`smear.py` has the
construction and why it is exact). Being ordinary attention, it stays right under everything the engine does with
its cache: continuous batching (no batch neighbour is ever read), chunked prefill, prefix caching, preemption.

Everything else is a transcription of `modeling_nanochat.py` (which stays the reference; the MLP, the rotary
frequencies, RoPE and the norm are its own functions) with vLLM's attention:
weightless RMSNorm, value embeddings with their gates, resid/x0 lambdas, backout, RoPE (nanochat's sign) then
QK-norm and the 1.2 scale, S/L windows per layer, ReLU^2, the untied padded head and the fp32 logit softcap.
Tensor and pipeline parallelism and vLLM's quantization are refused with a message (one device serves these models
comfortably).
"""

from collections.abc import Iterable

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from ..configuration_nanochat import NanoChatConfig
from ..modeling_nanochat import NanoChatMLP, NanoChatRotaryEmbedding, add_outer_parameters, apply_rotary, rms_norm
from .smear import SMEAR_WINDOW, smear_query_key


class UnservableCheckpoint(ValueError):
    """A checkpoint or engine setting this implementation cannot serve exactly; the message says why and what to do."""


def _check_serving(config: NanoChatConfig, vllm_config: VllmConfig):
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise UnservableCheckpoint(
            f"nanochat's vLLM model runs on one device (got tensor_parallel_size={parallel.tensor_parallel_size}, "
            f"pipeline_parallel_size={parallel.pipeline_parallel_size}); these models fit one GPU: serve with "
            "--tensor-parallel-size 1, and run several replicas for more throughput")
    if vllm_config.quant_config is not None:
        raise UnservableCheckpoint(
            f"nanochat's vLLM model does not run vLLM's quantization ({vllm_config.quant_config.get_name()}): serve "
            "it unquantized, or quantized through the transformers backend (--model-impl transformers "
            "--trust-remote-code), which is not exact at decode (README, Serve)")
    if config.hidden_size % config.head_dim:
        raise UnservableCheckpoint(
            f"hidden_size={config.hidden_size} is not a multiple of head_dim={config.head_dim}: the smear layer "
            "stores the embedding in heads of head_dim; nanochat models always have hidden = heads * head_dim")


class NanoChatAttention(nn.Module):
    def __init__(self, config, layer_idx, window, cache_config, quant_config, prefix):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.ve_gate = nn.Linear(config.ve_gate_channels, self.num_kv_heads, bias=False) \
            if layer_idx in config.value_embed_layers else None
        self.attn = Attention(self.num_heads, self.head_dim, scale=self.head_dim ** -0.5,
                              num_kv_heads=self.num_kv_heads, cache_config=cache_config, quant_config=quant_config,
                              per_layer_sliding_window=window, prefix=f"{prefix}.attn")

    def forward(self, x, cos, sin, value_embed):
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if self.ve_gate is not None:
            gate = self.config.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., : self.config.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * value_embed.view(n, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        eps = self.config.rms_norm_eps
        q, k = rms_norm(q, eps), rms_norm(k, eps)  # QK-norm after RoPE (nanochat's order)
        if self.config.qk_norm_scale != 1.0:
            q, k = q * self.config.qk_norm_scale, k * self.config.qk_norm_scale
        out = self.attn(q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1))
        return self.o_proj(out)


class NanoChatDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx, window, cache_config, quant_config, prefix):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.self_attn = NanoChatAttention(config, layer_idx, window, cache_config, quant_config,
                                           prefix=f"{prefix}.self_attn")
        self.mlp = NanoChatMLP(config)

    def forward(self, x, cos, sin, value_embed):
        x = x + self.self_attn(rms_norm(x, self.eps), cos, sin, value_embed)
        return x + self.mlp(rms_norm(x, self.eps))


class SmearAttention(nn.Module):
    """Reads the previous token's normalized embedding from the paged KV cache (see the module docstring). Its keys
    and values are stored like any layer's; it has no weights."""

    def __init__(self, config, cache_config, prefix):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.hidden_size // config.head_dim
        # scale 1: the scores are exactly +-SMEAR_SCORE (smear.py)
        self.attn = Attention(self.num_heads, self.head_dim, scale=1.0, num_kv_heads=self.num_heads,
                              cache_config=cache_config, per_layer_sliding_window=SMEAR_WINDOW, prefix=prefix)

    def forward(self, x, positions):
        n = x.shape[0]
        q, k = smear_query_key(positions, self.num_heads, self.head_dim, x.dtype)
        return self.attn(q.reshape(n, -1), k.reshape(n, -1), x)


def _nanochat_config(vllm_config):
    config = vllm_config.model_config.hf_config
    if not isinstance(config, NanoChatConfig):  # loaded as remote code: the same fields, our class
        config = NanoChatConfig(**config.to_dict())
    return config


# vLLM compiles this forward (and on GPUs captures it in CUDA graphs) unless told --enforce-eager
@support_torch_compile
class NanoChatVLLMModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model"):
        super().__init__()
        self.config = config = _nanochat_config(vllm_config)
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        max_len = vllm_config.model_config.max_model_len
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        layers = []
        for i in range(config.num_hidden_layers):
            window = config.layer_window(i)  # nanochat's left window; the engine counts the query too
            # a full layer's window (nanochat's sequence_len) only matters for contexts longer than it
            keys = window + 1 if window >= 0 and (config.layer_types[i] == "sliding_attention" or
                                                  max_len > window + 1) else None
            layers.append(NanoChatDecoderLayer(config, i, keys, cache_config, quant_config,
                                               prefix=f"{prefix}.layers.{i}"))
        self.layers = nn.ModuleList(layers)
        add_outer_parameters(self, config)  # NanoChatHFModel's, under its names: the checkpoint loads by name
        # the engine's layer index is the one integer in an attention layer's name: the smear layer comes after
        # the blocks
        n = config.num_hidden_layers
        self.smear_attn = SmearAttention(config, cache_config, prefix=f"{prefix}.smear.{n}.attn") \
            if config.smear else None
        self.register_buffer("inv_freq", NanoChatRotaryEmbedding.compute_inv_freq(config), persistent=False)

    def rotary(self, positions, dtype):
        # fp32 outer product positions x frequencies, as NanoChatRotaryEmbedding computes it; (T, 1, head_dim/2)
        freqs = positions[:, None, None].float() * self.inv_freq.to(positions.device)[None, None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.config.rope_bf16_tables:
            cos, sin = cos.bfloat16(), sin.bfloat16()
        return cos.to(dtype), sin.to(dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        x = rms_norm(self.embed_tokens(input_ids), cfg.rms_norm_eps)
        if self.smear_gate is not None:
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., : cfg.smear_channels]))
            prev = self.smear_attn(x, positions)
            cont = (positions > 0).unsqueeze(-1).to(x.dtype)  # position 0 has no previous token
            x = x + cont * gate * prev
        cos, sin = self.rotary(positions, x.dtype)
        x0, x_backout = x, None
        for i, layer in enumerate(self.layers):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if str(i) in self.value_embeds else None
            x = layer(x, cos, sin, ve)
            if i == cfg.backout_layer:
                x_backout = x
        if self.backout_lambda is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        return rms_norm(x, cfg.rms_norm_eps)


class NanoChatForVLLM(nn.Module):
    """vLLM's model class for `NanoChatHFForCausalLM` checkpoints (registered by `modeling_nanochat.engines`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = config = _nanochat_config(vllm_config)
        _check_serving(config, vllm_config)
        self.model = NanoChatVLLMModel(vllm_config=vllm_config, prefix="model")
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)

    def embed_input_ids(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if input_ids is None:
            raise UnservableCheckpoint("nanochat looks its value embeddings up by token id: serve it with token ids "
                                       "(prompt embeddings cannot drive it)")
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states):
        # as NanoChatHFForCausalLM: drop the vocabulary padding, fp32, then the softcap
        logits = self.lm_head(hidden_states)[..., : self.config.vocab_size].float()
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded, unknown = set(), []
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; recomputed here
                continue
            param = params.get(name)
            if param is None:
                unknown.append(name)
                continue
            if tuple(param.shape) != tuple(tensor.shape):
                raise UnservableCheckpoint(f"weight {name} has shape {tuple(tensor.shape)}, the config says "
                                           f"{tuple(param.shape)}: config.json and model.safetensors are of "
                                           "different models; save the model again with save_pretrained")
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if unknown or missing:
            raise UnservableCheckpoint(
                f"this checkpoint does not match nanochat's architecture as its config.json describes it "
                f"(unknown weights: {unknown[:5]}, missing: {missing[:5]}); serve a directory saved by this project "
                "(save_pretrained or its recipes), or convert a nanochat checkpoint with nanochat-convert")
        return loaded


__all__ = ["NanoChatForVLLM", "SmearAttention", "UnservableCheckpoint"]

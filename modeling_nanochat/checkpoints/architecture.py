"""The architecture facts other modules need, each stated once and derived from the model wherever it can be.

The optimizer groups (optim.muon_adamw), the scaling-law parameter counts and the depth dial's reference model
(optim.scaling), and the LoRA targets and 4/8-bit skips (adapters.lora) used to keep their own lists of parameter
names, layer names and config fields, which drift apart when the model changes. Here they are read off a model built
on the meta device (no memory, ~20 ms):

* the role of every parameter: `lm_head` (the output embedding), `embedding` (the input embedding), `value_embeds`
  (every other nn.Embedding), `block` (everything inside a decoder layer: the `_no_split_modules` class), and, for
  the base model's remaining own parameters, the optimizer group the model class names in `_nanochat_scalar_groups`
  (resid / x0 / smear: nanochat's setup_optimizer choice, which no module tree can tell);
* name rules for those roles (`parameter_role`), for callers that hold only names (wrapped, sharded or PEFT models);
* LoRA targets: the leaf names of the Linear layers inside the blocks, less the gates the model class names in
  `_nanochat_gate_modules`; quantization skips: every other Linear layer (lm_head and the gates);
* the depth-independent config fields: the config's constructor arguments that the depth dial does not change.

Stated, not derived: nanochat's own parameter names (`NANOCHAT_KEY_TEMPLATES`), an external format that no model of
ours can tell; tests/checkpoints/test_architecture.py checks that their side of it covers every parameter of ours.
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
from torch import nn

from modeling_nanochat.configuration_nanochat import NanoChatConfig
from modeling_nanochat.modeling_nanochat import NanoChatForCausalLM

LM_HEAD, EMBEDDING, VALUE_EMBEDS, BLOCK = "lm_head", "embedding", "value_embeds", "block"

# The config the name rules and the default LoRA targets are read from: the smallest default one, which has every
# switch on (value embeddings, lambdas, smear, backout), so every kind of parameter is present.
REFERENCE_CONFIG = dict(depth=2)

# nanochat key <-> our key; {i} is a layer index. nanochat's names are its own checkpoint format, so they are stated
# here rather than derived (the converter builds its rename rules from this; transformers' own `nanochat` already
# uses our names).
NANOCHAT_KEY_TEMPLATES = [
    ("transformer.wte.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("transformer.h.{i}.attn.c_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("transformer.h.{i}.attn.c_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("transformer.h.{i}.attn.c_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("transformer.h.{i}.attn.c_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("transformer.h.{i}.attn.ve_gate.weight", "model.layers.{i}.self_attn.ve_gate.weight"),
    ("transformer.h.{i}.mlp.c_fc.weight", "model.layers.{i}.mlp.fc1.weight"),
    ("transformer.h.{i}.mlp.c_proj.weight", "model.layers.{i}.mlp.fc2.weight"),
    ("value_embeds.{i}.weight", "model.value_embeds.{i}.weight"),
    ("resid_lambdas", "model.resid_lambdas"),
    ("x0_lambdas", "model.x0_lambdas"),
    ("smear_lambda", "model.smear_lambda"),
    ("backout_lambda", "model.backout_lambda"),
    ("smear_gate.weight", "model.smear_gate.weight"),
]


def meta_model(config) -> NanoChatForCausalLM:
    """The model of `config` on the meta device: its module tree and shapes, without memory."""
    with torch.device("meta"):
        return NanoChatForCausalLM(config)


@functools.cache
def reference_model() -> NanoChatForCausalLM:
    return meta_model(NanoChatConfig(**REFERENCE_CONFIG))


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every decoder layer: the class transformers must not split across devices."""
    kinds = set(model._no_split_modules)
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in kinds]


def _base_prefix(model: nn.Module) -> str:
    """'model.' when `model` is a CausalLM holding the base model, '' when it is the base model."""
    prefix = model.base_model_prefix
    return f"{prefix}." if isinstance(getattr(model, prefix, None), nn.Module) else ""


def _owners(model: nn.Module) -> dict[str, tuple[str, str]]:
    """{parameter name: (role, owner)}; the owner is the decoder layer's name for block parameters, else the
    parameter's own name (what the name rules generalise)."""
    found = {}

    def claim(owner, module, role):
        for name, _ in module.named_parameters(prefix=owner):
            found.setdefault(name, (role, owner if role == BLOCK else name))

    head, wte = model.get_output_embeddings(), model.get_input_embeddings()
    for name, module in model.named_modules():
        if head is not None and module is head:
            claim(name, module, LM_HEAD)
        elif module is wte:
            claim(name, module, EMBEDDING)
        elif isinstance(module, nn.Embedding):
            claim(name, module, VALUE_EMBEDS)
    for name, module in blocks(model):
        claim(name, module, BLOCK)
    prefix, groups = _base_prefix(model), model._nanochat_scalar_groups
    for name, _ in model.named_parameters():
        if name not in found:
            attribute = name.removeprefix(prefix).split(".")[0]
            if attribute not in groups:
                raise ValueError(f"parameter {name} has no role: add {attribute!r} to "
                                 f"{type(model).__name__}._nanochat_scalar_groups (or put it in a block)")
            found[name] = (groups[attribute], name)
    return {name: found[name] for name, _ in model.named_parameters()}  # in the model's order


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """{parameter name: role} of a NanoChat model (CausalLM or base model), read off its module tree."""
    return {name: role for name, (role, _) in _owners(model).items()}


def _generalise(name: str) -> str:
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


@functools.cache
def role_rules() -> tuple[tuple[str, re.Pattern], ...]:
    """(role, pattern) per kind of parameter of the reference model: layer indices become \\d+, the base-model
    prefix 'model.' is optional (the CausalLM and the base model both match), and a block rule matches everything
    under a decoder layer (adapters, new matrices)."""
    model = reference_model()
    prefix = _base_prefix(model)
    rules = {}
    for role, owner in _owners(model).values():
        inside = prefix and owner.startswith(prefix)
        head = f"(?:{re.escape(prefix)})?" if inside else ""
        tail = r"\." if role == BLOCK else "$"
        rules.setdefault(f"^{head}{_generalise(owner.removeprefix(prefix) if inside else owner)}{tail}", role)
    return tuple((role, re.compile(pattern)) for pattern, role in rules.items())


def parameter_role(name: str) -> str | None:
    """The role of a parameter by its name alone (wrapper prefixes such as 'module.' already removed); None when
    the name is none of the model's."""
    return next((role for role, pattern in role_rules() if pattern.match(name)), None)


def lora_target_modules(model: nn.Module | None = None) -> tuple[str, ...]:
    """Leaf names of the Linear layers inside the decoder layers, less the gates (in module order)."""
    model = reference_model() if model is None else model
    gates, leaves = set(model._nanochat_gate_modules), []
    for _, block in blocks(model):
        for name, module in block.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and leaf not in gates and leaf not in leaves:
                leaves.append(leaf)
    return tuple(leaves)


def quant_skip_modules(model: nn.Module | None = None) -> tuple[str, ...]:
    """Leaf names (sorted) of every Linear layer LoRA does not adapt (lm_head and the gates): bitsandbytes keeps
    them in full precision."""
    model = reference_model() if model is None else model
    targets = set(lora_target_modules(model))
    return tuple(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in targets}))



def high_precision_groups(model: nn.Module | None = None) -> dict[str, tuple[str, ...]]:
    """The model's small or sensitive modules by group, as leaf names (what quantization keeps in float by
    default): "embeddings" (the token embedding table), "value_embeds" (the value-embedding tables), "head"
    (lm_head) and "gates" (the tiny smear / value-embedding gates the model class names in `_nanochat_gate_modules`)."""
    model = reference_model() if model is None else model
    value_embeds = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == VALUE_EMBEDS]
    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    return {"embeddings": (embedding.rsplit(".", 1)[-1],), "value_embeds": (VALUE_EMBEDS,) if value_embeds else (),
            "head": (head.rsplit(".", 1)[-1],), "gates": tuple(model._nanochat_gate_modules)}


@functools.cache
def depth_independent_fields(config_class=NanoChatConfig) -> tuple[str, ...]:
    """Constructor arguments of the config that the depth dial does not set: those equal in two configs that differ
    only in depth (the depth, widths, head counts and per-layer lists differ)."""
    names = [p for p in inspect.signature(config_class.__init__).parameters if p not in ("self", "kwargs")]
    a, b = config_class(depth=2), config_class(depth=3)
    return tuple(n for n in names if getattr(a, n) == getattr(b, n))


def config_at_depth(config, depth: int):
    """The same architecture at another depth (sizes re-derived by the depth dial)."""
    return type(config)(depth=depth, **{k: getattr(config, k) for k in depth_independent_fields(type(config))})


__all__ = ["LM_HEAD", "EMBEDDING", "VALUE_EMBEDS", "BLOCK", "NANOCHAT_KEY_TEMPLATES", "meta_model", "reference_model",
           "blocks", "parameter_roles", "role_rules", "parameter_role", "lora_target_modules", "quant_skip_modules",
           "high_precision_groups",
           "depth_independent_fields", "config_at_depth"]

"""checkpoints.architecture: the architecture facts other modules use are derived from the model itself (meta
device, no memory), match what the model has at every depth and era, and follow the model when it changes."""

import re

import pytest
import torch
from torch import nn

from modeling_nanochat import ARCHITECTURE_ERAS, NanoChatConfig
from modeling_nanochat.adapters import lora
from modeling_nanochat.checkpoints import architecture as arch
from modeling_nanochat.checkpoints.convert import KEY_TEMPLATES
from modeling_nanochat.modeling_nanochat import NanoChatDecoderLayer
from modeling_nanochat.optim.muon_adamw import build_param_groups
from modeling_nanochat.optim.scaling import parameter_counts

DEPTHS = (2, 4, 12)
SCALAR_ROLES = {"resid", "x0", "smear"}


def _expected_roles(model):
    """Each parameter's role found independently of the module under test: by object identity and class."""
    head, wte = model.lm_head.weight, model.model.embed_tokens.weight
    in_block = {id(p) for m in model.modules() if isinstance(m, NanoChatDecoderLayer) for p in m.parameters()}
    value_embeds = {id(e.weight) for e in model.model.value_embeds.values()}
    out = {}
    for name, p in model.named_parameters():
        out[name] = ("lm_head" if p is head else "embedding" if p is wte else "value_embeds" if id(p) in value_embeds
                     else "block" if id(p) in in_block else "scalar")
    return out


@pytest.mark.parametrize("depth", DEPTHS)
def test_every_parameter_gets_exactly_one_role(depth):
    model = arch.meta_model(NanoChatConfig(depth=depth))
    roles = arch.parameter_roles(model)
    assert list(roles) == [n for n, _ in model.named_parameters()]
    expected = _expected_roles(model)
    for name, role in roles.items():
        assert (role if role not in SCALAR_ROLES else "scalar") == expected[name], name
        # the name rules (for callers holding only names) agree, and exactly one of them matches
        matching = [r for r, pattern in arch.role_rules() if pattern.match(name)]
        assert matching == [role], name
        assert arch.parameter_role(name.removeprefix("model.")) == role  # the base model's names too
    assert {r for r in roles.values() if r in SCALAR_ROLES} == SCALAR_ROLES
    assert arch.parameter_roles(model.model) == {n.removeprefix("model."): r for n, r in roles.items()
                                                 if n.startswith("model.")}


@pytest.mark.parametrize("era", sorted(ARCHITECTURE_ERAS))
def test_every_era_is_covered_by_the_roles_and_the_nanochat_keys(era):
    model = arch.meta_model(NanoChatConfig.for_era(era, depth=4))
    roles = arch.parameter_roles(model)
    ours = [re.escape(dst).replace(r"\{i\}", r"\d+") for _, dst in KEY_TEMPLATES]
    for name, _ in model.named_parameters():
        assert arch.parameter_role(name) == roles[name], name
        assert sum(bool(re.fullmatch(p, name)) for p in ours) == 1, name  # one nanochat key per parameter
    counts = parameter_counts(model.config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", DEPTHS)
def test_lora_targets_are_the_block_linear_leaves(depth):
    model = arch.meta_model(NanoChatConfig(depth=depth))
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    targets = arch.lora_target_modules(model)
    assert set(targets) == leaves - set(model._nanochat_gate_modules)
    assert targets == lora.LORA_TARGET_MODULES == ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(arch.quant_skip_modules(model)) == linear - set(targets)
    assert lora.QUANT_SKIP_MODULES == ("lm_head", "smear_gate", "ve_gate")


@pytest.mark.parametrize("depth", DEPTHS)
def test_adamw_muon_split_covers_every_parameter_once(depth):
    model = arch.meta_model(NanoChatConfig(depth=depth))
    groups = build_param_groups(model)
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters())  # each once, none left out
    assert [g["name"] for g in groups if g["kind"] == "adamw"] == ["lm_head", "embedding", "value_embeds", "resid",
                                                                   "x0", "smear"]
    roles = arch.parameter_roles(model)
    by_id = {id(p): roles[n] for n, p in model.named_parameters()}
    for g in groups:
        assert {by_id[id(p)] for p in g["params"]} == ({"block"} if g["kind"] == "muon" else {g["name"]})


def test_the_facts_follow_the_model():
    """A new Linear in a block becomes a LoRA target and a Muon matrix; a new scalar without a role is refused."""
    model = arch.meta_model(NanoChatConfig(depth=2))
    with torch.device("meta"):
        for layer in model.model.layers:
            layer.mlp.fc3 = nn.Linear(8, 8, bias=False)
    assert arch.lora_target_modules(model) == lora.LORA_TARGET_MODULES + ("fc3",)
    assert "fc3" not in arch.quant_skip_modules(model)
    assert arch.parameter_roles(model)["model.layers.0.mlp.fc3.weight"] == "block"

    class WiderMLP(type(model.model.layers[0].mlp)):
        def __init__(self, config):
            super().__init__(config)
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    with torch.device("meta"):
        model.model.layers[1].mlp = WiderMLP(model.config)
    assert "gate_proj" in arch.lora_target_modules(model)

    model.model.register_parameter("mystery", nn.Parameter(torch.empty(3, device="meta")))
    with pytest.raises(ValueError, match=r"model\.mystery has no role"):
        arch.parameter_roles(model)


def test_config_at_depth_keeps_every_field_but_the_depth_dial():
    fields = set(arch.depth_independent_fields())
    assert {"num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "value_embed_layers",
            "layer_types"}.isdisjoint(fields)
    assert {"vocab_size", "value_embeds", "smear", "backout", "residual_lambdas", "rope_theta"} <= fields
    for era in ARCHITECTURE_ERAS:
        at12 = arch.config_at_depth(NanoChatConfig.for_era(era, depth=4), 12)
        assert at12.to_dict() == NanoChatConfig.for_era(era, depth=12).to_dict(), era
        assert parameter_counts(at12) == parameter_counts(NanoChatConfig.for_era(era, depth=12))

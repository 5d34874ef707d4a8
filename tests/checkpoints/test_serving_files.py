"""A saved checkpoint carries what TGI's and vLLM's transformers backends (and `transformers serve`) read, checked
statically on the files as written by training (checkpointing.save_checkpoint) and by the converter
(convert.save_hf_checkpoint). What each item is for (HF_NOTES §2, §5):

* config.json `auto_map` with AutoConfig, AutoModel (vLLM's transformers backend builds the *base* model) and
  AutoModelForCausalLM (TGI), each naming a file saved next to the weights, whose absolute imports outside the
  standard library are only torch and transformers (what `check_imports` lets through on a server without our package);
* `_supports_attention_backend = True` on the classes those names resolve to (`is_backend_compatible()`: TGI's
  TransformersFlashCausalLM and vLLM's backend need it, else TGI falls back to its slow unsharded path);
* the standard size names servers read, and `final_logit_softcapping` (the cap vLLM's own head drops);
* tokenizer.json (TGI's Rust router) and the chat template inside tokenizer_config.json (TGI reads it only there,
  not from chat_template.jinja) with the generation markers written exactly as TGI strips them, and a tokenizer
  class transformers 4.x knows;
* generation_config.json stopping on <|assistant_end|> and <|bos|> with a pad id, so servers end a turn;
* safetensors weights (TGI converts .bin, vLLM prefers safetensors).
Loading on transformers 4.51/4.57/5.x in a fresh process is tests/model/test_remote_code.py.
"""

import ast
import json
import sys

import pytest
from conftest import FIXTURES, perturbed_model, tiny_config
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

from modeling_nanochat.tokenizer.chat_format import CHAT_TEMPLATE
from modeling_nanochat.checkpoints.training_state import save_checkpoint
from modeling_nanochat.checkpoints.convert import save_hf_checkpoint
from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer

SERVER_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "vocab_size", "max_position_embeddings", "layer_types", "sliding_window", "rms_norm_eps")


@pytest.fixture(scope="module")
def tok():
    return convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))


@pytest.fixture(scope="module", params=["training", "converter"])
def ckpt(request, tmp_path_factory, tok):
    out = tmp_path_factory.mktemp(request.param) / "ckpt"
    model = perturbed_model(tiny_config())
    if request.param == "training":
        save_checkpoint(str(out), model=model, tokenizer=tok, optimizer_state={}, loader_states=[{}],
                        trainer_state={"step": 1})
    else:
        save_hf_checkpoint(model.state_dict(), tiny_config(), str(out), tokenizer=tok)
    return out


def _json(path):
    return json.loads(path.read_text())


def _classes(path):
    """{class name: (base names, {attribute: literal value})} of a Python file, without importing it."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            attrs = {t.id: ast.literal_eval(n.value) for n in node.body if isinstance(n, ast.Assign)
                     for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
            out[node.name] = ([b.id for b in node.bases if isinstance(b, ast.Name)], attrs)
    return out


def _class_attr(classes, name, attr):
    """An attribute as Python resolves it through the bases defined in the same file (first base first)."""
    if name not in classes:
        return None
    bases, attrs = classes[name]
    if attr in attrs:
        return attrs[attr]
    for base in bases:
        found = _class_attr(classes, base, attr)
        if found is not None:
            return found
    return None


def test_auto_map_names_saved_remote_code_that_servers_can_import(ckpt):
    auto_map = _json(ckpt / "config.json")["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    for ref in auto_map.values():
        module, cls = ref.rsplit(".", 1)
        path = ckpt / f"{module}.py"
        assert path.is_file(), f"{ref}: {path.name} not saved with the weights"
        assert cls in _classes(path)
        # the files a server copies and imports, and the packages it then requires to be installed
        for f in [path, *map(type(path), get_relative_import_files(str(path)))]:
            assert f.parent == ckpt and f.is_file()
            third_party = set(get_imports(str(f))) - set(sys.stdlib_module_names)
            assert third_party <= {"torch", "transformers"}, f"{f.name} needs {third_party} on the server"


def test_model_classes_accept_server_attention_backends(ckpt):
    auto_map = _json(ckpt / "config.json")["auto_map"]
    for key in ("AutoModel", "AutoModelForCausalLM"):
        module, cls = auto_map[key].rsplit(".", 1)
        classes = _classes(ckpt / f"{module}.py")
        assert _class_attr(classes, cls, "_supports_attention_backend") is True, (key, cls)
    modeling = (ckpt / "modeling_nanochat.py").read_text()
    assert "ALL_ATTENTION_FUNCTIONS" in modeling  # attention goes through the registry servers register into


def test_config_has_the_names_servers_read(ckpt):
    config = _json(ckpt / "config.json")
    missing = [k for k in SERVER_CONFIG_KEYS if config.get(k) is None]
    assert not missing, missing
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    assert config["model_type"] == "nanochat_hf"  # not transformers' own "nanochat", which would win over auto_map
    assert isinstance(config["final_logit_softcapping"], float) and config["final_logit_softcapping"] > 0
    assert len(config["layer_types"]) == config["num_hidden_layers"]


def test_tokenizer_files_carry_the_chat_template_for_tgi(ckpt):
    assert (ckpt / "tokenizer.json").is_file()
    cfg = _json(ckpt / "tokenizer_config.json")
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # "TokenizersBackend" is unknown to 4.x / TGI
    template = cfg["chat_template"]
    stripped = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "generation" not in stripped.replace("add_generation_prompt", "")  # TGI strips only the exact markers
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|bos|>", "<|assistant_end|>")


def test_generation_config_ends_turns(ckpt, tok):
    gen = _json(ckpt / "generation_config.json")
    config = _json(ckpt / "config.json")
    end, bos = tok.convert_tokens_to_ids("<|assistant_end|>"), tok.convert_tokens_to_ids("<|bos|>")
    assert set(gen["eos_token_id"]) == {end, bos}
    assert gen["pad_token_id"] == config["pad_token_id"] == bos
    assert config["eos_token_id"] == end and config["bos_token_id"] == bos


def test_weights_are_safetensors(ckpt):
    assert (ckpt / "model.safetensors").is_file()
    assert not list(ckpt.glob("*.bin"))

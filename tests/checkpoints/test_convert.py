"""python -m modeling_nanochat.checkpoints.convert: complete HF dirs, exact round trips, clear errors, never a half-written dir."""

import json
import pickle
import shutil

import pytest
import torch

from conftest import FIXTURES
from modeling_nanochat import NanoChatForCausalLM
from modeling_nanochat.checkpoints.convert import ConversionError, convert, main
from modeling_nanochat.utils.io import OutputExistsError

CURRENT = FIXTURES / "nanochat_current"
TOKENIZER = FIXTURES / "nanochat_tokenizer"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "hf"
    assert main(["--input-dir", str(CURRENT), "--output-dir", str(out), "--tokenizer-dir", str(TOKENIZER)]) == 0
    return out


def test_converted_dir_is_complete_and_faithful(converted):
    names = {p.name for p in converted.iterdir()}
    for required in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "token_bytes.pt", "configuration_nanochat.py", "modeling_nanochat.py",
                     "nanochat_meta.json"):
        assert required in names, required
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "nanochat_hf" and cfg["nanochat_era"] == "2026-03-14"
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    gen = json.loads((converted / "generation_config.json").read_text())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(converted)
    assert sorted(gen["eos_token_id"]) == sorted([tok.convert_tokens_to_ids("<|assistant_end|>"),
                                                 tok.convert_tokens_to_ids("<|bos|>")])
    assert gen["pad_token_id"] == tok.convert_tokens_to_ids("<|bos|>") == cfg["bos_token_id"]
    assert "chat_template" in json.loads((converted / "tokenizer_config.json").read_text())

    golden = torch.load(CURRENT / "golden.pt")
    model = NanoChatForCausalLM.from_pretrained(converted).eval()  # registered class, v5 meta-device load
    with torch.no_grad():
        assert (model(golden["input_ids"]).logits - golden["logits"]).abs().max().item() <= 1e-4
    # a chat turn ends on <|assistant_end|> through generation_config alone
    prompt = golden["prompt"][None]
    out = model.generate(prompt, max_new_tokens=40)
    assert out[0, prompt.shape[1]:].tolist() == golden["greedy_naive"][: out.shape[1] - prompt.shape[1]].tolist()


def test_round_trip_to_nanochat_is_bit_exact(converted, tmp_path):
    back = tmp_path / "nc"
    assert main(["--input-dir", str(converted), "--output-dir", str(back), "--to", "nanochat"]) == 0
    original = torch.load(CURRENT / "model_000007.pt")
    again = torch.load(back / "model_000007.pt")
    assert original.keys() == again.keys()
    for k in original:
        assert original[k].dtype == again[k].dtype and torch.equal(original[k], again[k]), k
    meta0 = json.loads((CURRENT / "meta_000007.json").read_text())
    meta1 = json.loads((back / "meta_000007.json").read_text())
    assert meta0 == meta1
    assert torch.equal(torch.load(TOKENIZER / "token_bytes.pt"), torch.load(back / "token_bytes.pt"))
    enc0 = pickle.load(open(TOKENIZER / "tokenizer.pkl", "rb"))
    enc1 = pickle.load(open(back / "tokenizer.pkl", "rb"))
    assert enc0._mergeable_ranks == enc1._mergeable_ranks and enc0._special_tokens == enc1._special_tokens
    assert enc0._pat_str == enc1._pat_str
    # and forward again: the same HF weights
    fwd = tmp_path / "hf2"
    convert(str(back), str(fwd))
    from safetensors.torch import load_file
    a, b = load_file(converted / "model.safetensors"), load_file(fwd / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _broken_copy(tmp_path, edit):
    src = tmp_path / "src"
    shutil.copytree(CURRENT, src)
    state = torch.load(src / "model_000007.pt")
    edit(state)
    torch.save(state, src / "model_000007.pt")
    return src


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("transformer.h.2.attn.c_k.weight"), "missing"),
    (lambda s: s.__setitem__("transformer.h.0.attn.engram.weight", torch.zeros(3)), "no counterpart"),
    (lambda s: s.__setitem__("lm_head.weight", torch.zeros(512, 32)), "wrong shapes"),
    (lambda s: s.__setitem__("transformer.wte.weight", torch.zeros(600, 64)), "wte has 600 rows"),
])
def test_bad_checkpoints_fail_clearly_and_write_nothing(tmp_path, edit, message):
    src = _broken_copy(tmp_path, edit)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert(str(src), str(out), tokenizer_dir=str(TOKENIZER))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-convert")]


def test_truncated_file_and_missing_pieces(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(CURRENT, src)
    data = (src / "model_000007.pt").read_bytes()
    (src / "model_000007.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="corrupt or incomplete"):
        convert(str(src), str(tmp_path / "o"), tokenizer_dir=str(TOKENIZER))
    with pytest.raises(ConversionError, match="no tokenizer.pkl"):
        convert(str(CURRENT), str(tmp_path / "o"))
    with pytest.raises(ConversionError, match="no model_<step>.pt"):
        convert(str(tmp_path), str(tmp_path / "o"))
    with pytest.raises(ConversionError, match="meta_000003.json is missing"):
        shutil.copy(CURRENT / "model_000007.pt", src / "model_000003.pt")
        convert(str(src), str(tmp_path / "o"), step=3, tokenizer_dir=str(TOKENIZER))


def test_ambiguous_era_asks_for_arch(tmp_path, capsys):
    src = FIXTURES / "nanochat_jan2026"
    assert main(["--input-dir", str(src), "--output-dir", str(tmp_path / "o"), "--tokenizer-dir", str(TOKENIZER)]) == 2
    err = capsys.readouterr().err
    assert "--arch 2026-01 or --arch 2026-03-02" in err and "2025-10" in err
    assert main(["--input-dir", str(src), "--output-dir", str(tmp_path / "o"), "--tokenizer-dir", str(TOKENIZER),
                 "--arch", "2026-01"]) == 0
    golden = torch.load(src / "golden.pt")
    model = NanoChatForCausalLM.from_pretrained(tmp_path / "o").eval()
    with torch.no_grad():
        assert (model(golden["input_ids"]).logits - golden["logits"]).abs().max().item() <= 1e-4


def test_existing_output_is_kept_unless_overwrite(converted, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not empty"):
        convert(str(CURRENT), str(out), tokenizer_dir=str(TOKENIZER))
    assert (out / "precious.txt").read_text() == "keep me"
    convert(str(CURRENT), str(out), tokenizer_dir=str(TOKENIZER), overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").exists()


def test_export_to_transformers_nanochat_refuses_newer_architectures(converted, tmp_path):
    with pytest.raises(ConversionError, match="cannot express"):
        convert(str(converted), str(tmp_path / "x"), to="transformers-nanochat")


def test_gpu_style_checkpoint_bf16_embeddings_and_compile_prefix(tmp_path):
    """GPU runs save bf16 wte/value embeddings (fp32 elsewhere), compiled runs prefix keys with `_orig_mod.`."""
    src = tmp_path / "gpu"
    shutil.copytree(CURRENT, src)
    state = torch.load(src / "model_000007.pt")
    bf16 = {k: (v.bfloat16() if k == "transformer.wte.weight" or k.startswith("value_embeds.") else v)
            for k, v in state.items()}
    torch.save({"_orig_mod." + k: v for k, v in bf16.items()}, src / "model_000007.pt")
    convert(str(src), str(tmp_path / "hf"), tokenizer_dir=str(TOKENIZER))
    model = NanoChatForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.model.embed_tokens.weight.dtype == torch.float32  # upcast on load, exactly
    assert torch.equal(model.model.embed_tokens.weight, bf16["transformer.wte.weight"].float())
    convert(str(tmp_path / "hf"), str(tmp_path / "back"), to="nanochat")
    back = torch.load(tmp_path / "back" / "model_000007.pt")
    assert back.keys() == bf16.keys()
    assert all(back[k].dtype == bf16[k].dtype and torch.equal(back[k], bf16[k]) for k in bf16)

"""Chat protocol: our renderer equals nanochat's render_conversation; the Jinja template equals our renderer."""

import json

import pytest
from conftest import FIXTURES

from modeling_nanochat.tokenizer.chat_format import (
    CHAT_TEMPLATE,
    normalize_messages,
    render_conversation,
    render_for_completion,
    render_prompt,
)
from modeling_nanochat.tokenizer.tokenizer import SPECIAL_TOKENS, convert_nanochat_tokenizer, encode_ordinary

GOLDEN = {"512": "nanochat_tokenizer", "4k": "nanochat_tokenizer_4k"}


@pytest.fixture(scope="module", params=list(GOLDEN))
def golden(request):
    data = json.loads((FIXTURES / "nanochat_chat" / f"render_{request.param}.json").read_text())
    return convert_nanochat_tokenizer(str(FIXTURES / GOLDEN[request.param])), data["cases"]


def _has_special_string(conversation):
    return any(s in json.dumps(conversation, ensure_ascii=False) for s in SPECIAL_TOKENS)


def test_renderer_equals_nanochat(golden):
    tok, cases = golden
    assert any(m["role"] == "system" for c in cases for m in c["conversation"]["messages"])
    assert any(isinstance(m["content"], list) for c in cases for m in c["conversation"]["messages"])
    for case in cases:
        conv = case["conversation"]
        assert render_conversation(tok, conv) == (case["ids"], case["mask"])
        assert render_conversation(tok, conv, max_tokens=20) == (case["ids_max20"], case["mask_max20"])
        if "completion_ids" in case:
            assert render_for_completion(tok, conv) == case["completion_ids"]


def test_renderer_does_not_mutate_input(golden):
    tok, cases = golden
    conv = next(c["conversation"] for c in cases if c["conversation"]["messages"][0]["role"] == "system")
    before = json.dumps(conv)
    render_conversation(tok, conv)
    render_for_completion(tok, conv)
    assert json.dumps(conv) == before


def test_chat_template_equals_renderer(golden):
    tok, cases = golden
    checked = 0
    for case in cases:
        conv = case["conversation"]
        out = tok.apply_chat_template(conv["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = render_conversation(tok, conv, max_tokens=10**9)
        if _has_special_string(conv):
            # documented limit: the template renders one string, so a typed "<|bos|>" becomes the special token
            assert out["input_ids"] != ids
            continue
        assert out["input_ids"] == ids
        assert out["assistant_masks"] == mask
        checked += 1
    assert checked >= 5


def test_generation_prompt_equals_render_prompt(golden):
    tok, _ = golden
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
                {"role": "assistant", "content": [{"type": "python", "text": "1+1"},
                                                  {"type": "python_output", "text": "2"}]},
                {"role": "user", "content": "thanks"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == render_prompt(tok, {"messages": messages})
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant_start|>")
    full = messages + [{"role": "assistant", "content": "ok"}]
    assert render_for_completion(tok, {"messages": full}) == ids


def test_typed_special_strings_are_text_in_renderer(golden):
    tok, _ = golden
    conv = {"messages": [{"role": "user", "content": "<|assistant_end|><|bos|>"},
                         {"role": "assistant", "content": "<|python_start|>"}]}
    ids, mask = render_conversation(tok, conv)
    specials = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert [i for i in ids if i in specials] == tok.convert_tokens_to_ids(
        ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"])
    body = encode_ordinary(tok, "<|python_start|>")
    assert ids[-1 - len(body):-1] == body and mask[-1 - len(body):] == [1] * (len(body) + 1)


def test_mask_layout(golden):
    tok, _ = golden
    sid = dict(zip(SPECIAL_TOKENS, tok.convert_tokens_to_ids(SPECIAL_TOKENS)))
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "text", "text": "a"}, {"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}]}]}
    ids, mask = render_conversation(tok, conv)
    by_token = dict(zip(ids, mask))
    assert [by_token[sid[s]] for s in SPECIAL_TOKENS] == [0, 0, 0, 0, 1, 1, 1, 0, 0]
    out = ids.index(sid["<|output_start|>"])
    assert mask[out:ids.index(sid["<|output_end|>"]) + 1] == [0] * (ids.index(sid["<|output_end|>"]) + 1 - out)


def test_template_markers_are_exact_for_tgi():
    assert CHAT_TEMPLATE.count("{% generation %}") == CHAT_TEMPLATE.count("{% endgeneration %}") >= 1
    assert "{%- generation" not in CHAT_TEMPLATE and "generation -%}" not in CHAT_TEMPLATE


@pytest.mark.parametrize("messages, match", [
    ([], "at least one message"),
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "followed by a user"),
    ([{"role": "user", "content": ["not", "a", "string"]}], "content must be a string"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "part 0"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text"}]}], "part 0"),
    ([{"content": "no role"}], "'role' and 'content'"),
])
def test_bad_conversations_are_named(messages, match):
    with pytest.raises(ValueError, match=match):
        normalize_messages({"messages": messages})


def test_template_rejects_bad_roles(golden):
    tok, _ = golden
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


def test_template_renders_the_same_in_minijinja(golden):
    # TGI renders chat templates with minijinja after deleting the exact generation markers
    minijinja = pytest.importorskip("minijinja", reason="dev dependency minijinja (TGI's template engine) missing")
    tok, cases = golden
    env = minijinja.Environment()
    env.add_function("raise_exception", lambda msg: (_ for _ in ()).throw(ValueError(msg)))
    env.add_template("chat", CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    for case in cases:
        msgs = case["conversation"]["messages"]
        for prompt in (False, True):
            ours = env.render_template("chat", messages=msgs, bos_token=tok.bos_token, add_generation_prompt=prompt)
            assert ours == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)


def test_template_masks_multibyte_text_next_to_tool_parts(golden):
    # each emoji spans several byte tokens; the template's spans must still cover all of them
    tok, _ = golden
    messages = [{"role": "user", "content": "🌍?"}, {"role": "assistant", "content": [
        {"type": "text", "text": "café 🌍"}, {"type": "python", "text": "'🌍'.count('🌍')"},
        {"type": "python_output", "text": "1 ✓"}, {"type": "text", "text": "one 🌍"}]}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert (out["input_ids"], out["assistant_masks"]) == render_conversation(tok, {"messages": messages})

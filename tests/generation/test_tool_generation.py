"""Tool-use generation on real transformers model classes whose weights are set to emit a calculator call."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import FIXTURES, perturbed_model, tiny_config
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM
from modeling_nanochat.generation.calculator import use_calculator
from modeling_nanochat.tokenizer.chat_format import render_prompt
from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer, encode_ordinary
from modeling_nanochat.generation.tool_use import IncrementalDecoder, generate, generate_batch, stream_text


@pytest.fixture(scope="module")
def tok():
    return convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))


def _nanochat(vocab):
    return NanoChatForCausalLM(NanoChatConfig(depth=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                                              vocab_size=vocab, max_position_embeddings=64))


def _llama(vocab):
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def wired_model(build, tok, expression):
    """A model that answers with <|python_start|> expression <|python_end|>, then <|assistant_end|> after the tool
    output. Blocks are zeroed (the residual stream carries the token embedding alone); each token of the chain gets
    its own embedding direction, and the output layer maps that direction to the next token of the chain."""
    sid = tok.convert_tokens_to_ids
    chain = ["<|assistant_start|>", "<|python_start|>", *encode_ordinary(tok, expression), "<|python_end|>"]
    chain = [sid(t) if isinstance(t, str) else t for t in chain]
    steps = list(zip(chain, chain[1:])) + [(sid("<|output_end|>"), sid("<|assistant_end|>"))]
    assert len({a for a, _ in steps}) == len(steps), "each token may lead to one next token only"
    torch.manual_seed(0)
    model = build(len(tok)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name:
                p.zero_()
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for k, (a, b) in enumerate(steps):
            emb[a] = 0
            emb[a, k] = 1.0
            head[b, k] = 10.0
    return model, [t for _, t in steps[:-1]]


def _prompt(tok, question="what is 2 + 3?"):
    return render_prompt(tok, {"messages": [{"role": "user", "content": question}]})


@pytest.mark.parametrize("build", [_nanochat, _llama], ids=["NanoChatForCausalLM", "LlamaForCausalLM"])
def test_calculator_result_is_forced_and_masked(tok, build):
    model, call = wired_model(build, tok, "2+3")
    sid = tok.convert_tokens_to_ids
    forced = [sid("<|output_start|>"), *encode_ordinary(tok, str(use_calculator("2+3"))), sid("<|output_end|>")]
    expected = call + forced + [sid("<|assistant_end|>")]
    columns = list(generate(model, tok, _prompt(tok), num_samples=3, max_tokens=30, temperature=0.0))
    assert len(columns) == len(expected)  # all rows stop on <|assistant_end|>
    for row in range(3):
        assert [c[row] for c, _ in columns] == expected
        assert [m[row] for _, m in columns] == [1] * len(call) + [0] * len(forced) + [1]
    assert tok.decode(forced) == "<|output_start|>5<|output_end|>"


def test_sampling_rows_and_batch_results(tok):
    model, call = wired_model(_nanochat, tok, "2+3")
    prompt = _prompt(tok)
    seqs, masks = generate_batch(model, tok, prompt, num_samples=2, max_tokens=30, temperature=1.0, top_k=5, seed=1)
    for seq, mask in zip(seqs, masks):
        assert seq[:len(prompt)] == prompt and len(seq) == len(mask)
        text = tok.decode(seq[len(prompt):])
        assert text == "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>"  # terminal left out
        assert sum(m == 0 for m in mask[len(prompt):]) == len(encode_ordinary(tok, "5")) + 2


def test_refused_expression_forces_nothing(tok):
    model, call = wired_model(_nanochat, tok, "x+1")
    columns = [c[0] for c, _ in generate(model, tok, _prompt(tok), max_tokens=len(call) + 3, temperature=0.0)]
    assert columns[:len(call)] == call
    assert tok.convert_tokens_to_ids("<|output_start|>") not in columns
    with_tools_off = [c[0] for c, _ in generate(model, tok, _prompt(tok), max_tokens=len(call) + 3, temperature=0.0,
                                                calculator=None)]
    assert with_tools_off == columns


def test_stream_text_in_worker_thread(tok):
    # the app streams from Gradio worker threads: the calculator must work there (no SIGALRM)
    model, _ = wired_model(_nanochat, tok, "6*7")
    with ThreadPoolExecutor(1) as pool:
        pieces = pool.submit(lambda: list(stream_text(model, tok, _prompt(tok), max_tokens=30, temperature=0))).result()
    assert "".join(pieces) == "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>"
    assert len(pieces) > 3  # streamed piece by piece, not at the end
    skipped = "".join(stream_text(model, tok, _prompt(tok), skip_special_tokens=True, max_tokens=30, temperature=0))
    assert skipped == "6*742"


def test_incremental_decoder_holds_back_partial_characters(tok):
    text = "naïve 🌍 ok"
    ids = [b for b in text.encode("utf-8")]  # byte b is token b: every multi-byte character spans tokens
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_bad_prompt_and_temperature(tok):
    model, _ = wired_model(_nanochat, tok, "4+5")
    with pytest.raises(ValueError, match="list of token ids"):
        next(generate(model, tok, "hello"))
    with pytest.raises(ValueError, match="temperature"):
        next(generate(model, tok, _prompt(tok), temperature=-1))


def _perturbed_llama(vocab):
    torch.manual_seed(0)
    model = _llama(vocab).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    return model


@pytest.mark.parametrize("build", [lambda vocab: perturbed_model(tiny_config(vocab_size=vocab)), _perturbed_llama],
                         ids=["NanoChatForCausalLM", "LlamaForCausalLM"])
def test_several_prompts_decode_as_each_alone(tok, build):
    """Prompts of different lengths in one batch (left-padded, masked, per-row positions, the smear reading each
    row's own last token): every row continues its prompt exactly as that prompt decodes alone."""
    model = build(len(tok))
    prompts = [_prompt(tok, "what is 2 + 3?"), _prompt(tok, "and how many apples are left if I eat seven of twelve?"),
               _prompt(tok, "hi")]
    assert len({len(p) for p in prompts}) == 3
    together = list(generate(model, tok, prompts, num_samples=2, max_tokens=12, temperature=0.0, calculator=None))
    assert all(len(column) == 6 for column, _ in together)  # num_samples rows per prompt, in prompt order
    for k, prompt in enumerate(prompts):
        alone = [c[0] for c, _ in generate(model, tok, prompt, max_tokens=12, temperature=0.0, calculator=None)]
        for row in (2 * k, 2 * k + 1):
            assert [c[row] for c, _ in together][:len(alone)] == alone


def test_calculator_runs_per_row_in_a_mixed_batch(tok):
    model, call = wired_model(_nanochat, tok, "2+3")
    sid = tok.convert_tokens_to_ids
    forced = [sid("<|output_start|>"), *encode_ordinary(tok, "5"), sid("<|output_end|>")]
    prompts = [_prompt(tok, "what is 2 + 3?"), _prompt(tok, "a longer question, also about 2 + 3?")]
    seqs = [[], [], []]
    masks = [[], [], []]
    for column, mask in generate(model, tok, prompts + [prompts[0]], max_tokens=30, temperature=0.0):
        for row in range(3):
            seqs[row].append(column[row])
            masks[row].append(mask[row])
    for row in range(3):
        assert seqs[row] == call + forced + [sid("<|assistant_end|>")]
        assert masks[row] == [1] * len(call) + [0] * len(forced) + [1]


class _StopsAt:
    """The fixture tokenizer, except that <|assistant_end|> is id `stop`: a token the test model really emits."""

    def __init__(self, tok, stop):
        self.tok, self.stop = tok, stop

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __len__(self):
        return len(self.tok)

    def convert_tokens_to_ids(self, token):
        return self.stop if token == "<|assistant_end|>" else self.tok.convert_tokens_to_ids(token)

    def convert_ids_to_tokens(self, i):
        return "<|assistant_end|>" if i == self.stop else self.tok.convert_ids_to_tokens(i)


def test_finished_rows_leave_a_mixed_batch(tok):
    """Several prompts: rows that finished are dropped from the forwards (their cache rows left behind) once a quarter
    of the batch has; the rows still running continue exactly as alone, the dropped ones repeat their stop token."""
    model = perturbed_model(tiny_config(vocab_size=len(tok)))
    a, b = _prompt(tok, "and how many apples are left if I eat seven of twelve?"), _prompt(tok, "hi")
    first_b = next(generate(model, tok, b, max_tokens=1, temperature=0.0, calculator=None))[0][0]
    stops = _StopsAt(tok, first_b)  # b's rows finish on their first token
    alone = [c[0] for c, _ in generate(model, stops, a, max_tokens=12, temperature=0.0, calculator=None)]
    assert len(alone) > 4 and first_b not in alone[:-1]
    rows = []
    model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    steps = list(generate(model, stops, [a, b, b, a], max_tokens=12, temperature=0.0, calculator=None))
    assert rows[0] == 2 and set(rows[1:]) == {2}  # two distinct prompts prefilled; b's rows never decoded again
    for r in (0, 3):
        assert [c[r] for c, _ in steps][:len(alone)] == alone
    for r in (1, 2):
        assert [c[r] for c, _ in steps] == [first_b] * len(steps)
        assert [m[r] for _, m in steps] == [1] + [0] * (len(steps) - 1)

"""Generation: greedy sequences vs transformers' generate, seeds, stop rules, cache reuse, chat."""

from __future__ import annotations

import pytest
from hy_edge_format.errors import BudgetError
from runtime_helpers import converted, hf_model

import edge_runtime
from edge_runtime.text.chat import encode_chat, render

PROMPT = "Edge devices run small language models."


@pytest.fixture(scope="module")
def hy(hunyuan_f32_dir):
    return edge_runtime.load(converted(hunyuan_f32_dir, "none"))


@pytest.fixture(scope="module")
def hy8(hunyuan_f32_dir):
    return edge_runtime.load(converted(hunyuan_f32_dir, "e4m3"))


def hf_greedy(src, ids, n):
    import torch

    model = hf_model(src)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("which", ["hunyuan_f32_dir", "llama_dir"])
def test_greedy_matches_transformers_generate(which, request):
    src = request.getfixturevalue(which)
    model = edge_runtime.load(converted(src, "none"))
    ids = model.encode_prompt(PROMPT, raw=True)
    eos = model.default_generator.eos_ids
    n = 24
    expected = hf_greedy(src, ids, n)

    # suppress EOS as min_new_tokens does, so both run all n steps
    def no_eos(tokens, logits):
        logits[list(eos)] = -float("inf")
        return logits

    gen = model.generator()
    got = [r.token for r in gen.stream(ids, max_tokens=n, logits_processors=[no_eos])]
    assert got == expected


def test_same_seed_same_text_and_backends_agree(hy8):
    kw = dict(max_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    a = hy8.generate(PROMPT, **kw)
    b = hy8.generate(PROMPT, **kw)
    ort = hy8.generate(PROMPT, generator=hy8.generator("onnxruntime"), **kw)
    c = hy8.generate(PROMPT, **{**kw, "seed": 8})
    assert a.token_ids == b.token_ids == ort.token_ids
    assert a.text == b.text
    assert c.token_ids != a.token_ids


def test_max_tokens_and_stats(hy8):
    gen = hy8.generator()
    gen.eos_ids = frozenset()  # no EOS can end it early: max_tokens must
    r = hy8.generate(PROMPT, max_tokens=5, min_p=0.05, temperature=0.7, seed=1, generator=gen)
    assert r.finish_reason == "length" and r.completion_tokens == len(r.token_ids) == 5
    assert r.prompt_tokens == len(hy8.encode_prompt(PROMPT))
    assert r.ttft_s > 0 and r.prefill_tps > 0 and r.peak_rss_mb > 0
    assert r.decode_tps > 0 or r.completion_tokens == 1


def test_stop_string_cuts_the_text(hy):
    gen = hy.generator()
    full = hy.generate(PROMPT, max_tokens=30, generator=gen, raw=True)
    text = full.text
    assert len(text) > 6, text
    stop = text[3:6]
    cut = hy.generate(PROMPT, max_tokens=30, generator=gen, raw=True, stop=[stop, "never-appears"])
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert stop not in cut.text


def test_eos_stops_with_reason_stop(hy):
    ids = hy.encode_prompt(PROMPT)
    gen = hy.generator()
    first = next(iter(gen.stream(ids, max_tokens=1)))
    eos = first.token  # make whatever comes first the EOS
    gen2 = edge_runtime.Generator(hy.session(), hy.tokenizer, eos_ids=[eos])
    (only,) = list(gen2.stream(ids, max_tokens=10))
    assert only.finish_reason == "stop" and only.token == eos and only.text == ""


def test_context_full_finishes_with_length(hy):
    ids = hy.encode_prompt(PROMPT)
    gen = hy.generator(max_context=len(ids) + 3)
    rs = list(gen.stream(ids, max_tokens=100))
    assert rs[-1].finish_reason == "length" and len(rs) == 4  # the 4th token is sampled, never run
    with pytest.raises(BudgetError):
        list(hy.generator(max_context=len(ids) - 1).stream(ids, max_tokens=5))


@pytest.mark.parametrize("backend", ["numba", "onnxruntime"])
def test_cache_reuse_across_turns_equals_fresh(hy8, backend):
    gen = hy8.generator(backend)
    turn1 = [{"role": "user", "content": "Hello there!"}]
    r1 = hy8.generate(turn1, max_tokens=8, generator=gen)
    turn2 = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And then?"}]
    r2 = hy8.generate(turn2, max_tokens=8, generator=gen)
    fresh = hy8.generate(turn2, max_tokens=8, generator=hy8.generator(backend))
    assert r2.token_ids == fresh.token_ids
    assert r2.cached_tokens > 0 and fresh.cached_tokens == 0
    # a diverging prompt truncates to the common prefix and still matches a fresh run
    other = [{"role": "user", "content": "Hello where?"}]
    r3 = hy8.generate(other, max_tokens=8, generator=gen)
    assert r3.token_ids == hy8.generate(other, max_tokens=8, generator=hy8.generator(backend)).token_ids
    # the same prompt again: everything but the last token comes from the cache
    r4 = hy8.generate(other, max_tokens=8, generator=gen)
    assert r4.token_ids == r3.token_ids and r4.cached_tokens == r4.prompt_tokens - 1


def test_chat_template_matches_transformers(hunyuan_f32_dir, llama_dir):
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi, 日本語 🙂"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    for src in (hunyuan_f32_dir, llama_dir):
        model = edge_runtime.load(converted(src, "none"))
        hf = AutoTokenizer.from_pretrained(src)
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert encode_chat(model.tokenizer, messages) == list(expected)
        assert model.tokenizer.encode(PROMPT) == hf(PROMPT)["input_ids"]


def test_template_helpers():
    tpl = (
        "{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
        "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
    )
    msgs = [{"role": "user", "content": "é<b>"}]
    assert render(tpl, msgs) == '"é<b>"'
    assert render(tpl, msgs, enable_thinking=False) == '"é<b>"/no_think'
    with pytest.raises(edge_runtime.HyEdgeError, match="one message only"):
        render(tpl, msgs * 2)
    assert "20" in render("{{ strftime_now('%Y') }}", [])

"""Chat templates render as transformers renders them, including Hunyuan's thinking switch."""

from __future__ import annotations

import pytest

from edge_runtime.text.chat import render

# Shaped like Hunyuan-0.5B-Instruct's template: a /no_think in the last user turn or
# enable_thinking=false pre-fills an empty think block after the assistant tag.
THINKING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}<｜hy_place▁holder▁no▁3｜>"
    "{% elif m['role'] == 'user' %}<｜hy_User｜>{{ m['content'] }}"
    "{% else %}<｜hy_Assistant｜>{{ m['content'] }}<｜hy_place▁holder▁no▁2｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜hy_Assistant｜>"
    "{% set no_think = messages[-1]['content'].endswith('/no_think') %}"
    "{% if (enable_thinking is defined and not enable_thinking) or no_think %}<think>\n\n</think>\n{% endif %}"
    "{% endif %}"
)


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("last", ["What is 2+2?", "What is 2+2? /no_think"])
def test_render_matches_transformers(hunyuan_f32_dir, thinking, last):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hunyuan_f32_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": last},
    ]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    expected = tok.apply_chat_template(
        messages, chat_template=THINKING_TEMPLATE, tokenize=False, add_generation_prompt=True, **kwargs
    )
    ours = render(
        THINKING_TEMPLATE,
        messages,
        add_generation_prompt=True,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        **kwargs,
    )
    assert ours == expected
    assert ("<think>" in ours) == (thinking is False or last.endswith("/no_think"))

"""What transformers makes of a GGUF file: run as a script (a separate process, so the ~60 s that
transformers' GGUF parsing takes on SmolLM2 overlaps with the rest of the suite) or imported.

    python tests/gguf_reference.py model.gguf out.json

The result is JSON: sha256 of the float32 bytes of selected dequantized tensors (layer 0, the last
layer, and everything outside the layers), config fields, and token ids / decodings of TEXTS and
of MESSAGES rendered by the file's chat template.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 366 days; π ≈ 3.14159.",
    "naïve café — “quotes” 日本語のテキスト 🙂 Ελληνικά",
    "  leading spaces\n\ttabs\n\n\nnewlines   trailing  ",
    "don't WON'T I'll we've",
    "def f(x):\n    return x**2  # comment",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? Say it in ünïcödé 🙂"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Thanks!"},
]
# Logits: ids fed from position 0; the reference keeps, per position, the 32 largest logits and their ids.
PROBE_IDS = [1, 504, 3458, 282, 4649, 314, 216, 1345, 30]
GOLDEN_PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
GOLDEN_TOKENS = 24
CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "rms_norm_eps",
)


def digest(array) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def selected(names, num_layers: int) -> list[str]:
    last = num_layers - 1
    return sorted(
        n
        for n in names
        if n.startswith(("model.layers.0.", f"model.layers.{last}.")) or not n.startswith("model.layers.")
    )


def reference(path: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    sd = model.state_dict()
    config = {f: getattr(model.config, f) for f in CONFIG_FIELDS}
    config["rope_theta"] = model.config.rope_parameters["rope_theta"]
    tensors = {
        n: {"shape": list(sd[n].shape), "sha256": digest(sd[n].float().numpy())}
        for n in selected(sd, model.config.num_hidden_layers)
    }
    del sd
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    probe, greedy = _logits_and_greedy(model, tok)
    del model
    chat = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    encoded = []
    for text in TEXTS + [chat]:
        ids = tok.encode(text)
        encoded.append(
            {
                "text": text,
                "ids": ids,
                "decoded": tok.decode(ids),
                "decoded_skip": tok.decode(ids, skip_special_tokens=True),
            }
        )
    return {"tensors": tensors, "config": config, "chat": chat, "encoded": encoded, "probe": probe, "greedy": greedy}


def _logits_and_greedy(model, tok) -> tuple[dict, dict]:
    """Top-32 logits per position for PROBE_IDS, and GOLDEN_TOKENS greedy tokens for GOLDEN_PROMPT."""
    import torch

    model = model.eval()  # GGUF tensors are dequantized to float32 on load
    with torch.no_grad():
        logits = model(torch.tensor([PROBE_IDS])).logits[0].float()
        top = torch.topk(logits, 32, dim=-1)
        prompt = tok.apply_chat_template(GOLDEN_PROMPT, tokenize=True, add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
        model.generation_config.eos_token_id = None
        out = model.generate(torch.tensor([prompt]), max_new_tokens=GOLDEN_TOKENS, do_sample=False, pad_token_id=0)[
            0, len(prompt) :
        ].tolist()
    probe = {"ids": PROBE_IDS, "top_ids": top.indices.tolist(), "top_logits": top.values.tolist()}
    return probe, {"prompt_ids": prompt, "tokens": out}


if __name__ == "__main__":
    result = reference(Path(sys.argv[1]))
    out = Path(sys.argv[2])
    out.with_suffix(".tmp").write_text(json.dumps(result))
    out.with_suffix(".tmp").replace(out)

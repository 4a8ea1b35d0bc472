"""The serving engine's prompt cache across a restart (prompt_cache.py), on a tiny model: the slots' reusable
prefixes saved when the loop ends come back bit for bit in a new session, a request sharing one prefills only
the rest and gets the logits and tokens of a cold engine; a file made for another model file or KV cache
type, or corrupt, truncated or foreign, is ignored with one line and the slots start empty; a failed write
leaves the previous file whole."""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest
from runtime_helpers import converted
from serve_helpers import seconds
from test_serve_engine import Collector, Recorder

import edge_runtime
from edge_runtime.integrity import content_digest
from edge_runtime.serve.engine import ALIGN, PREFILL_MIN, Engine
from edge_runtime.serve.prompt_cache import FILE_NAME, MAGIC, PromptCache, cache_key

TIMEOUT = seconds(60)


@pytest.fixture(scope="module")
def model(llama_dir):
    return edge_runtime.load(converted(llama_dir, "e4m3"), threads=1)


class CountingSession:
    """The session with the token ids of every prompt piece (prefill) kept."""

    def __init__(self, session):
        self._session, self.prefilled = session, []

    def __getattr__(self, name):
        return getattr(self._session, name)

    def piece(self, ids, slot):
        self.prefilled += list(ids)
        return self._session.piece(ids, slot)


def cache_for(model, session, path, notes=None) -> PromptCache:
    key = cache_key(content_digest(model.path, model.meta), session)
    return PromptCache(path, key, log=(notes if notes is not None else []).append)


def serve(model, path=None, notes=None) -> tuple[Engine, CountingSession]:
    """An engine on 2 slots, with a prompt cache at `path` (None: none), started and warm."""
    session = CountingSession(model.session(slots=2, max_context=256))
    cache = None if path is None else cache_for(model, session, path, notes)
    engine = Engine(session, model.tokenizer, prompt_cache=cache)
    engine.eos_ids = frozenset()  # random weights may sample EOS: every request runs to its max_tokens
    engine.start()
    assert engine.ready.wait(TIMEOUT)
    session.prefilled.clear()  # the warm-up's
    return engine, session


def answer(engine, prompt, max_tokens=5):
    recorder = Recorder()
    c = Collector(prompt, max_tokens, processors=[recorder])
    engine.submit(c.request)
    tokens, _, last = c.result()
    return tokens, recorder.rows, last


def stopped(engine) -> None:
    engine.stop()
    assert engine.join(TIMEOUT)


def test_saved_prefixes_come_back_bit_for_bit_and_a_request_prefills_only_the_rest(model, tmp_path):
    notes: list[str] = []
    path = tmp_path / FILE_NAME
    system = "You are a careful assistant. Numbers like 2024 and 3.14159 appear in text. " * 2
    first = model.encode_prompt([{"role": "system", "content": system}, {"role": "user", "content": "Hello"}])
    other = [t for t in range(100, 140) if t != first[0]]  # shares no prefix with `first`: its own slot
    assert len(first) > 2 * ALIGN + PREFILL_MIN

    engine, session = serve(model, path, notes)
    assert notes == [f"hy-edge: prompt cache {path} not loaded: no such file (it is written when the server stops)"]
    answer(engine, other, 3)
    answer(engine, first, 4)  # the most recently used slot: saved first
    stopped(engine)
    saved = session._session  # its KV as the first server left it
    assert notes[-1].startswith(f"hy-edge: prompt cache: saved 2 slots ({len(first) + len(other)} tokens, ")
    assert notes[-1].endswith(f" to {path}")
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # the token ids of users' prompts
    assert not [p for p in tmp_path.iterdir() if p.name != FILE_NAME]  # no temporary left
    used = [next(s.index for s in engine._slots if s.tokens[: len(p)] == p) for p in (first, other)]

    restarted, session2 = serve(model, path, notes)
    assert notes[-1] == f"hy-edge: prompt cache: loaded 2 slots ({len(first) + len(other)} tokens) from {path}"
    b0, b1 = saved.buf, session2.buf
    for new_slot, (old_slot, p) in enumerate(zip(used, (first, other), strict=True)):
        n = len(p)  # the prompt's rows (a prompt's prefill computed them); the reply's were not saved
        assert session2.positions[new_slot] == n
        for old, new in ((b0.k_cache, b1.k_cache), (b0.v_cache, b1.v_cache)):
            assert np.array_equal(old[:, old_slot, :, :n].view(np.uint8), new[:, new_slot, :, :n].view(np.uint8))

    turn2 = model.encode_prompt([{"role": "system", "content": system}, {"role": "user", "content": "Goodbye now"}])
    shared = next(i for i, (a, b) in enumerate(zip(first, turn2, strict=False)) if a != b)
    tokens, logits, last = answer(restarted, turn2)
    reused = shared - shared % ALIGN
    assert reused >= 2 * ALIGN and last.cached_tokens == reused
    assert session2.prefilled == turn2[reused:]  # only the rest was prefilled
    stopped(restarted)

    cold, cold_session = serve(model)
    cold_tokens, cold_logits, cold_last = answer(cold, turn2)
    stopped(cold)
    assert cold_last.cached_tokens == 0 and cold_session.prefilled == turn2
    assert tokens == cold_tokens
    assert len(logits) == len(cold_logits) == 5
    for got, want in zip(logits, cold_logits, strict=True):
        assert np.array_equal(got, want)  # bit for bit, the prefill's and the decode steps'


def saved_file(model, tmp_path) -> tuple[object, PromptCache]:
    """A session with one prompt prefilled into slot 1 and its cache file written."""
    session = model.session(slots=2, max_context=256)
    prompt = model.encode_prompt("Numbers like 2024 and 3.14159 appear in text " * 2)
    session.forward(np.asarray(prompt, np.int64), slot=1)
    cache = cache_for(model, session, tmp_path / FILE_NAME)
    assert cache.save(session, [(1, prompt)])
    return session, cache


def loaded(cache, session) -> tuple[list, list[str]]:
    notes: list[str] = []
    for slot in range(session.slots):  # what the slots held before: the file's prefixes, and nothing else, replace it
        session.forward(np.arange(20, dtype=np.int64), slot=slot)
    prefixes = PromptCache(cache.path, cache.key, notes.append).load(session)
    return prefixes, notes


def test_a_cache_of_another_model_file_or_kv_cache_type_is_ignored(model, llama_dir, tmp_path):
    session, cache = saved_file(model, tmp_path)
    prefixes, notes = loaded(cache, session)  # the file itself is good
    assert len(prefixes) == 1 and session.positions.tolist() == [len(prefixes[0]), 0]

    # the digest follows the content: a copy is the same model file, another conversion is not
    copy = tmp_path / "copy"
    shutil.copytree(model.path.parent, copy)
    assert content_digest(copy / model.path.name, model.meta) == cache.key["model"]
    other = edge_runtime.load(converted(llama_dir, "e5m2"), threads=1)
    other_key = dict(cache.key, model=content_digest(other.path, other.meta))
    assert other_key["model"] != cache.key["model"]
    prefixes, notes = loaded(PromptCache(cache.path, other_key), session)
    assert prefixes == [] and session.positions.tolist() == [0, 0]
    assert notes == [f"hy-edge: prompt cache {cache.path} not loaded: it was saved for another model file"]

    fp16 = model.session(slots=2, max_context=256, kv_cache="fp16")
    prefixes, notes = loaded(cache_for(model, fp16, cache.path), fp16)
    assert prefixes == [] and fp16.positions.tolist() == [0, 0]
    assert notes == [f"hy-edge: prompt cache {cache.path} not loaded: it was saved with another KV cache type"]
    saved = cache.path.read_bytes()
    assert not cache_for(model, fp16, cache.path).save(fp16, [])
    assert cache.path.read_bytes() == saved  # a server that had nothing to save leaves the file as it was


def test_a_corrupt_truncated_or_foreign_file_is_ignored(model, tmp_path):
    session, cache = saved_file(model, tmp_path)
    good = cache.path.read_bytes()
    (length,) = struct.unpack("<I", good[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4 + length  # the slot's token ids, then its KV rows
    flipped = bytearray(good)
    flipped[-3] ^= 0x10  # a bit of the last value row
    header = good[len(MAGIC) + 4 : start]
    cases = {
        "truncated (0 bytes)": b"",
        "not a hy-edge prompt cache": b"\x80\x04\x95 a pickle, say" * 20,
        f"it holds {len(good) - 100:,} bytes, its header describes {len(good):,} (truncated)": good[:-100],
        f"it holds {len(good) + 1:,} bytes, its header describes {len(good):,}": good + b"\0",
        "its header length": good[: start - 10],
        "beyond 1,048,576 bytes": good[: len(MAGIC)] + struct.pack("<I", 2 << 20) + b" " * (2 << 20),
        "slot 0's data does not match its checksum (corrupt)": bytes(flipped),
        "its header is not valid JSON": good[: len(MAGIC) + 4] + b"{" * length + good[start:],
        "format version 2, this runtime reads 1": good[: len(MAGIC) + 4]
        + header.replace(b'"version": 1', b'"version": 2')
        + good[start:],
    }
    for why, data in cases.items():
        cache.path.write_bytes(data)
        prefixes, notes = loaded(cache, session)
        assert prefixes == [] and session.positions.tolist() == [0, 0], why
        assert len(notes) == 1 and notes[0].startswith(f"hy-edge: prompt cache {cache.path} not loaded: ")
        assert (why if data else "not a hy-edge prompt cache") in notes[0]


def test_what_is_saved_is_bounded_and_what_is_loaded_fits_the_slots(model, tmp_path):
    session = model.session(slots=2, max_context=256)
    prompts = [list(range(100, 160)), list(range(200, 240))]
    for slot, p in enumerate(prompts):
        session.forward(np.asarray(p, np.int64), slot=slot)
    path = tmp_path / FILE_NAME
    La, _, Hkv, _, _ = session.buf.k_cache.shape
    row = 8 + 2 * La * Hkv * session.buf.k_cache[0, 0, 0, 0].nbytes  # a position: its id, its K and V rows
    small = PromptCache(path, cache_for(model, session, path).key, max_bytes=70 * row)
    assert small.save(session, [(1, prompts[1]), (0, prompts[0])])  # 40 rows, then 30 of the 60 fit
    one = model.session(slots=1, max_context=32)  # one slot of 32 positions: the first prefix, cut
    prefixes, notes = loaded(PromptCache(path, cache_for(model, one, path).key), one)
    assert prefixes == [prompts[1][:32]] and one.positions.tolist() == [32]
    two = model.session(slots=2, max_context=256)
    stale = tmp_path / f".{FILE_NAME}.12345.tmp"  # a save cut short by a kill: removed at the next start
    stale.write_bytes(b"half")
    prefixes, notes = loaded(PromptCache(path, cache_for(model, two, path).key), two)
    assert prefixes == [prompts[1], prompts[0][:30]] and not stale.exists()
    for new, (old, n) in enumerate(((1, 40), (0, 30))):
        for cache, back in ((session.buf.k_cache, two.buf.k_cache), (session.buf.v_cache, two.buf.v_cache)):
            assert np.array_equal(cache[:, old, :, :n], back[:, new, :, :n])
    logits = two.forward(np.asarray(prompts[0][30:], np.int64), slot=1)  # the rest of the cut prefix
    assert np.array_equal(logits, model.session(max_context=256).forward(np.asarray(prompts[0], np.int64)))


def test_a_failed_write_leaves_the_previous_file_whole(model, tmp_path, monkeypatch):
    session, cache = saved_file(model, tmp_path)
    before = cache.path.read_bytes()
    notes: list[str] = []

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    prompt = list(range(40))
    session.forward(np.asarray(prompt, np.int64), slot=0)
    assert not PromptCache(cache.path, cache.key, notes.append).save(session, [(0, prompt)])
    assert notes == [f"hy-edge: prompt cache not saved to {cache.path}: No space left on device"]
    assert cache.path.read_bytes() == before and sorted(tmp_path.iterdir()) == [cache.path]


def test_sigterm_saves_the_cache_and_the_restarted_server_answers_the_same_from_it(default_model_file, tmp_path):
    import httpx
    from serve_helpers import HTTP_TIMEOUT, ServerProcess, child_env

    args = ["--model", str(default_model_file), "--max-context", "256", "--max-batch", "2"]
    args += ["--prompt-cache", str(tmp_path)]
    system = "You answer in one short sentence, in plain English, without lists or code. " * 3
    body = {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    answers, logs = [], []
    for _ in range(2):
        server = ServerProcess(args, env=child_env())
        try:
            r = httpx.post(server.wait_ready() + "/v1/chat/completions", json=body, timeout=HTTP_TIMEOUT)
            assert r.status_code == 200, r.text
            answers.append(r.json())
        finally:
            assert server.stop() == 0, server.log()  # SIGTERM
            logs.append(server.log())
            server.cleanup()
    P = answers[0]["usage"]["prompt_tokens"]
    assert "not loaded: no such file" in logs[0] and f"saved 1 slot ({P} tokens, " in logs[0]
    assert f"loaded 1 slot ({P} tokens)" in logs[1]
    assert not any("Traceback" in log for log in logs), logs
    cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
    assert cached == [0, (P - PREFILL_MIN) - (P - PREFILL_MIN) % ALIGN]
    assert answers[1]["choices"][0]["message"] == answers[0]["choices"][0]["message"]


def test_a_prompt_cache_directory_that_cannot_be_written_is_refused_at_once(tmp_path):
    pytest.importorskip("uvicorn")
    from click.testing import CliRunner

    from edge_runtime.cli import main

    afile = tmp_path / "afile"
    afile.write_text("")
    r = CliRunner().invoke(main, ["serve", "--prompt-cache", str(afile / "sub")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"hy-edge: error: --prompt-cache {afile / 'sub'}: not a writable directory (give one, or off)"
    ]


def test_dwconv_layers_get_their_conv_inputs_and_state_back(tmp_path):
    from runtime_helpers import make_seed_checkpoint

    src = make_seed_checkpoint(tmp_path / "seed", layer_types=["dwconv", "attention", "dwconv", "attention"])
    conv = edge_runtime.load(converted(src, "e4m3"), threads=1)
    prompt, rest = np.arange(3, 43, dtype=np.int64), np.arange(50, 60, dtype=np.int64)
    before = conv.session(slots=2, max_context=64)
    before.forward(prompt, slot=1)
    cache = cache_for(conv, before, tmp_path / FILE_NAME)
    assert cache.key["conv_shape"][0] == 2 and cache.save(before, [(1, prompt)])
    after = conv.session(slots=2, max_context=64)
    assert cache.load(after) == [prompt.tolist()]
    assert np.array_equal(after.buf.conv_state[:, 0], before.buf.conv_state[:, 1])  # rebuilt from the inputs
    assert np.array_equal(after.buf.conv_hist[:, 0, :40], before.buf.conv_hist[:, 1, :40])
    assert np.array_equal(after.forward(rest, slot=0), before.forward(rest, slot=1))

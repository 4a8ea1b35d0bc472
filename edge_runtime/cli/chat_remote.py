"""`hy-edge chat --url URL`: the chat loop against a running `hy-edge serve` (or any OpenAI-compatible
server) instead of a local model. The history is sent with every turn (the server reuses its cached
prefix); the reply streams as server-sent events. Standard library only: the runtime stays small."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from hy_edge_format.errors import HyEdgeError

from .chat_commands import ChatCommands

API_KEY_ENV = "HY_EDGE_API_KEY"


class RemoteChat(ChatCommands):
    """The same interface as cli.chat.ChatSession: turn(), command(), reset(), last (always None: the
    stats line is local-only; /stats shows the server's usage of the last turn)."""

    def __init__(self, url: str, sampling, system: str | None, timeout: float = 600):
        if not url.startswith(("http://", "https://")):
            raise HyEdgeError(f"--url should start with http:// or https://, got {url}")
        s = sampling
        if s.top_k or s.min_p or s.repetition_penalty != 1.0:
            raise HyEdgeError("--top-k, --min-p and --repetition-penalty are not available with --url")
        self.endpoint = url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
        self.sampling, self.system, self.timeout = sampling, system, timeout
        self.key = os.environ.get(API_KEY_ENV, "").strip() or None
        self.messages: list[dict] = []
        self.last = None
        self.usage: dict | None = None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def turn(self, text: str, write, notice=lambda message: None) -> None:
        s = self.sampling
        messages = [*self.messages, {"role": "user", "content": text}]
        body = {
            "messages": messages,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if s.seed is not None and s.seed >= 0:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.endpoint, json.dumps(body).encode(), headers, method="POST")
        reply = []
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                for raw in response:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise HyEdgeError(f"server: {chunk['error'].get('message')}")
                    if chunk.get("usage"):
                        self.usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            reply.append(piece)
                            write(piece)
        except urllib.error.HTTPError as e:
            raise HyEdgeError(f"server: {_error_message(e)}") from None
        except urllib.error.URLError as e:
            raise HyEdgeError(f"cannot reach {self.endpoint}: {e.reason}") from None
        except KeyboardInterrupt:
            notice("(interrupted)")
        write("\n")
        self.messages = [*messages, {"role": "assistant", "content": "".join(reply)}]

    def stats_text(self) -> str:
        u = self.usage
        return f"[{u['prompt_tokens']} prompt + {u['completion_tokens']} generated tokens]" if u else "(no reply yet)"


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return f"{json.loads(e.read())['error']['message']} (HTTP {e.code})"
    except Exception:
        return f"HTTP {e.code} {e.reason}"

"""`hy-edge chat`: a multi-turn session in a terminal or through a pipe.

The history is re-rendered through the chat template each turn; the Generator keeps its KV cache and
prefills only what the cache does not already hold (the new user turn, mostly). One line of input is
one user turn; lines starting with / are commands.
"""

from __future__ import annotations

import sys

import click
from hy_edge_format.errors import HyEdgeError

from .chat_commands import HELP, ChatCommands
from .common import (
    Sampling,
    check_text,
    model_options,
    open_model,
    sampling_options,
    stats_line,
    template_kwargs,
    user_errors,
)


class ChatSession(ChatCommands):
    """The conversation: messages, the model's generator (its cache), the last turn's stats."""

    def __init__(self, model, sampling: Sampling, system: str | None, template: dict):
        self.model = model
        self.sampling = sampling
        self.system = system
        self.template = template
        self.generator = model.generator()
        self.messages: list[dict] = []
        self.last = None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.generator.reset()

    def turn(self, text: str, write, notice=lambda message: None) -> None:
        """One user turn: stream the reply through `write`, keep it in the history. When the history
        outgrows the context, the oldest turns are dropped (the system message stays) with a notice.
        Ctrl-C stops the reply; what was said so far stays in the history."""
        messages = [*self.messages, {"role": "user", "content": text}]
        ids, dropped = self._fit(messages)
        if dropped:
            notice(f"(dropped the oldest {dropped} turn(s) to fit the context of {self.context} tokens)")
            messages = messages[: self._first] + messages[self._first + 2 * dropped :]
        reply = []
        try:
            for r in self.model.stream(ids, generator=self.generator, **self.sampling.kwargs()):
                if r.text:
                    reply.append(r.text)
                    write(r.text)
                self.last = r
        except KeyboardInterrupt:
            notice("(interrupted)")
        write("\n")
        self.messages = [*messages, {"role": "assistant", "content": "".join(reply)}]

    @property
    def context(self) -> int:
        return self.generator.backend.max_context

    @property
    def _first(self) -> int:
        """Index of the first droppable message (after the system message)."""
        return 1 if self.messages and self.messages[0]["role"] == "system" else 0

    def _fit(self, messages: list[dict]) -> tuple[list[int], int]:
        """Token ids of `messages` with the fewest oldest (user, assistant) pairs dropped that leaves
        room for a reply (a quarter of the context, or max_tokens if less); and how many were dropped."""
        room = min(self.sampling.max_tokens, self.context // 4)
        first, dropped = self._first, 0
        while True:
            kept = messages[:first] + messages[first + 2 * dropped :]
            ids = self.model.encode_prompt(kept, **self.template)
            if len(ids) + room <= self.context or len(kept) <= first + 1:
                return ids, dropped  # the new turn alone too long: the generator says so
            dropped += 1

    def stats_text(self) -> str:
        return stats_line(self.last) if self.last else "(no reply yet)"


@click.command("chat")
@sampling_options
@model_options
@click.option("--url", default=None, help="Chat with a running `hy-edge serve` (e.g. http://127.0.0.1:8000).")
def chat_cmd(system: str | None, thinking: bool | None, sampling: Sampling, url: str | None, **model_args) -> None:
    """Chat with the model: one line per turn; /help lists the commands."""
    interactive = sys.stdin.isatty()

    def write(text: str) -> None:
        click.echo(text, nl=False)  # flushes: the reply streams as it is generated

    with user_errors():
        if system is not None:
            check_text(system, "--system")
        if url is not None:
            from .chat_remote import RemoteChat

            if model_args.get("model_arg") is not None:
                raise HyEdgeError("--model and --url exclude each other (the server has its model)")
            chat, name = RemoteChat(url, sampling, system), url
        else:
            model = open_model(sampling, **model_args)
            if model.tokenizer is None:
                raise HyEdgeError(f"{model.path.name}: the model file carries no tokenizer")
            chat, name = ChatSession(model, sampling, system, template_kwargs(thinking)), model.path.name
        if interactive:
            click.echo(f"hy-edge chat ({name}); {HELP}; Ctrl-C stops a reply", err=True)
        while True:
            if interactive:
                click.echo(">>> ", nl=False, err=True)
            raw = sys.stdin.buffer.readline()  # bytes: a bad byte is one turn's error, not the session's end
            if not raw:
                break
            try:
                line = check_text(raw.decode("utf-8", errors="surrogateescape"), "this line").strip()
            except HyEdgeError as e:
                click.echo(f"hy-edge: error: {e}", err=True)
                continue
            if not line:
                continue
            if line.startswith("/"):
                reply = chat.command(line)
                if reply is None:
                    break
                click.echo(reply, err=True)
                continue
            try:
                chat.turn(line, write, notice=lambda message: click.echo(message, err=True))
            except HyEdgeError as e:  # e.g. one message longer than the context: say so, keep the session
                click.echo(f"hy-edge: error: {e}", err=True)
                continue
            if interactive and chat.last is not None:
                click.echo(stats_line(chat.last), err=True)
        if not interactive and chat.last is not None:
            click.echo(stats_line(chat.last), err=True)

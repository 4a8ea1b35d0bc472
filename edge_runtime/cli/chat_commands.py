"""The /commands of `hy-edge chat`, shared by the local session and the one against a server (--url)."""

from __future__ import annotations

HELP = "commands: /reset (forget the conversation), /system TEXT (new system message), /stats, /help, /exit"


class ChatCommands:
    """Mixed into a chat session that has `reset()`, a `system` message and `stats_text()`."""

    system: str | None

    def reset(self) -> None:
        raise NotImplementedError

    def stats_text(self) -> str:
        raise NotImplementedError

    def command(self, line: str) -> str | None:
        """Run a /command; returns what to print, or None to end the session."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return None
        if name == "/reset":
            self.reset()
            return "(conversation reset)"
        if name == "/system":
            self.system = arg.strip() or None
            self.reset()
            return f"(system message {'set' if self.system else 'cleared'}; conversation reset)"
        if name == "/stats":
            return self.stats_text()
        if name == "/help":
            return HELP
        return f"unknown command {name}; {HELP}"

"""`hy-edge serve`: the continuous-batching engine over one multi-slot session (engine, the prefill pieces'
rules in pieces), the OpenAI-compatible HTTP layer (http, bodies, shapes, protocol, metrics), the prompt cache
kept across restarts, and the systemd unit."""

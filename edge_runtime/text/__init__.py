"""From a prompt to text: tokenizers, chat templates, the generation loop over a session, sampling, and the
grammars and tool-call formats that hold an answer to a shape."""

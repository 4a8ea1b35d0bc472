"""Errors a user can cause. Library code raises these; only the CLI turns them into one line
(`hy-edge: error: ...`, exit code 2)."""

EXIT_USER_ERROR = 2  # the exit code of every error a user can cause (the CLI's one line)


class HyEdgeError(Exception):
    """Base for every error caused by input: a bad file, a bad option, a request over the budget."""


class SpecError(HyEdgeError):
    """A config that names an unsupported architecture or is inconsistent."""


class CheckpointError(HyEdgeError):
    """A checkpoint (safetensors, GGUF, directory) that is missing, truncated or not understood."""


class ModelFileError(HyEdgeError):
    """A converted .onnx file the runtime cannot run."""


class BudgetError(HyEdgeError):
    """A request that does not fit the memory budget or the context length."""

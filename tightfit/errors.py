"""Typed errors for bad input. Each message says what was expected, what arrived, and what to do."""


class TightfitError(Exception):
    """Base class of every error tightfit raises for bad user input."""


class ModelNotFoundError(TightfitError, FileNotFoundError):
    """A model source (path or name) that does not exist."""


class NotAModelError(TightfitError, ValueError):
    """A path that exists but holds no model tightfit can read."""


class GGUFFormatError(TightfitError, ValueError):
    """A file that claims to be GGUF but is not a valid, complete one."""


class UnsupportedArchitectureError(TightfitError, ValueError):
    """A model architecture that tightfit's code paths do not handle."""


class TextError(TightfitError, ValueError):
    """An evaluation or calibration text that cannot be used (missing, too short)."""


class TokenizerMismatchError(TightfitError, ValueError):
    """Two models compared with each other that do not share a tokenizer."""


class OutputExistsError(TightfitError, FileExistsError):
    """An output path that already exists and would be overwritten."""


class FormatError(TightfitError, ValueError):
    """A weight or KV format that does not exist or does not fit the tensor."""


class QuantizeError(TightfitError, ValueError):
    """A quantization request that cannot be carried out (method, target, calibration)."""


class ArtifactError(TightfitError, ValueError):
    """A tightfit artifact whose manifest is corrupt or does not match its contents."""


class ContextError(TightfitError, ValueError):
    """A prompt plus the tokens asked for do not fit the context."""


class MemoryBudgetError(TightfitError, ValueError):
    """A memory budget too small for what must stay resident."""


class LlamaCppBuildError(TightfitError, RuntimeError):
    """The installed llama-cpp-python build cannot run here (for example its AMX matmul crashes on this CPU)."""


class OutputWriteError(TightfitError, OSError):
    """An output could not be written (disk full, file too large, no permission); nothing partial is left."""

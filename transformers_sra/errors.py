"""Error types. All are raised before any weight changes, so a caught error leaves the model intact."""


class SRAError(Exception):
    """Base class; the CLI prints ``error: <message>`` for these instead of a traceback."""


class ConfigError(SRAError, ValueError):
    """An `SRAConfig` field has a value the method cannot use."""


class PromptSetError(SRAError, ValueError):
    """A prompt set is missing, empty or unreadable."""


class UnsupportedModelError(SRAError, TypeError):
    """The model's residual-stream writers could not be located with certainty."""


class DemoModelError(SRAError, RuntimeError):
    """The demo model's PyPI chunk packages are missing or corrupt."""


class NumericsError(SRAError, ArithmeticError):
    """NaN or Inf in activations, logits or a metric; the message names the layer and prompt where it appeared."""


class UndoError(SRAError, RuntimeError):
    """There is nothing to undo: the report was loaded from JSON or already undone."""

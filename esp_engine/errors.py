"""Exception types the engine raises; the server maps each to an HTTP status."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The caller asked for something malformed: an empty prompt, a bad sampling value.

    `param` names the setting at fault, as the OpenAI API calls it, when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested tokens do not fit the model's context."""


class InvalidSpecConfigError(InvalidRequestError):
    """Unknown method or preset, or a tree shape the method cannot build."""


class ModelLoadError(EngineError):
    """The model cannot be found locally or is not a causal language model."""

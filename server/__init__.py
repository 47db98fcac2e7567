"""esp-serve: an OpenAI-compatible HTTP server over the ESP speculative-decoding engine."""

from .app import ServerSettings, build_app

__all__ = ["ServerSettings", "build_app"]

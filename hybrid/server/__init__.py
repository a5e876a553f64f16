"""`hybrid serve`: an OpenAI- and Ollama-compatible HTTP server over one engine."""

from .app import create_app

__all__ = ["create_app"]

"""An OpenAI-compatible HTTP server over the generation API, with continuous batching."""

from attendo.server.app import create_app, serve
from attendo.server.served import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]

"""The OpenAI-compatible server (`pensieve serve`): needs the `serve` extra (fastapi, uvicorn, prometheus-client)."""

from pensieve.server.app import ServerConfig, create_app
from pensieve.server.cli import Server

__all__ = ["Server", "ServerConfig", "create_app"]

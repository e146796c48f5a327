"""Upstream simulator: a stand-in HTTP server for the Gemini image-generation gateway."""

from simulator.config import SimConfig
from simulator.server import make_server, start_in_thread

__all__ = ["SimConfig", "make_server", "start_in_thread"]

"""``chelsea serve``: an OpenAI-shaped HTTP server (:mod:`.app`) in front of an engine that batches
requests (:mod:`.engine`), admits them within limits (:mod:`.scheduler`) and reuses compressed
documents (:mod:`.documents`). Only :mod:`.app` needs the web framework."""

from .engine import Engine, servable_methods
from .protocol import Job, ServeError

__all__ = ["Engine", "Job", "ServeError", "servable_methods"]

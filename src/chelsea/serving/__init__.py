"""``chelsea serve``: an OpenAI-compatible HTTP server (:mod:`.app`, request bodies in
:mod:`.schema`) in front of an engine (:mod:`.engine`) that admits requests within limits
(:mod:`.scheduler`), prefills them on one thread and decodes them together on another
(:mod:`.decoder`), samples their tokens (:mod:`.sampling`), cuts their text at stop sequences
(:mod:`.text`) and reuses compressed documents (:mod:`.documents`). Only :mod:`.app` and
:mod:`.schema` need the web framework."""

from .engine import Engine, servable_methods
from .protocol import Job, Sampling, ServeError

__all__ = ["Engine", "Job", "Sampling", "ServeError", "servable_methods"]

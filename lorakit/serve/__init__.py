"""`lorakit serve`: an OpenAI-compatible server over one base model and many adapters, batched together.

request -> adapter (or tree node, or the base) -> a row of the running batch -> tokens -> text
"""

from lorakit.serve.engine import Engine, GenerationRequest
from lorakit.serve.server import build_server

__all__ = ["Engine", "GenerationRequest", "build_server"]

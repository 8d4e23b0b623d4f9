"""engine-factory runtime: loads an engine directory and generates. Never imports engine_factory."""
from .engine import Engine, Generation
from .errors import EngineError, UserError
from .spec import ModelSpec

__all__ = ["Engine", "Generation", "EngineError", "ModelSpec", "UserError"]
__version__ = "0.1.0"

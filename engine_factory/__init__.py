"""engine-factory: declarative, reproducible builds of LLM inference engines."""
__version__ = "0.1.0"

"""The library version: one place, read by pyproject.toml and written into every file we save."""

__version__ = "0.1.0"

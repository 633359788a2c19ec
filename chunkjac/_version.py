"""The package version (one place; pyproject reads it through chunkjac.__version__)."""
__version__ = "0.4.0"

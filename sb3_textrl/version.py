"""The package version (``setup.cfg`` reads it: ``version = attr: sb3_textrl.version.__version__``)."""

__all__ = ["__version__"]

__version__ = "0.1.0"

"""pypelinin for Python: workers for a pypelinin cluster (see README.md)."""
from .worker import worker

__all__ = ["worker"]
__version__ = "0.2.0"

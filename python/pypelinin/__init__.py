"""pypelinin for Python: workers for a pypelinin cluster, and its client (see README.md)."""
from .client import Job, Pipeline, PipelineManager, RouterError
from .worker import worker

__all__ = ["Job", "Pipeline", "PipelineManager", "RouterError", "worker"]
__version__ = "0.2.0"

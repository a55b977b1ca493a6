"""capgap: curate image-text data to close the modality gap of CLIP-style models.

The importable code lives in the namespaced subpackages ``capgap.pipeline``,
``capgap.transforms``, ``capgap.models`` and ``capgap.configs`` (mapped from the
top-level folders of the repository by setup.py).
"""

__version__ = "0.1.0"

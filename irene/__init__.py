"""IrEne: interpretable energy prediction of transformer models.

The library is importable without Hydra or MLflow; the pipeline glue lives in ``pipelines/``.
"""

from __future__ import annotations

__version__ = "0.1.0"

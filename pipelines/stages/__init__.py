"""The stages: one module each, found by :func:`pipelines.stage.stages` (see :mod:`pipelines.stage`)."""

"""vit-spine: cervical spine fracture detection on CT (RSNA 2022 layout) with a Vision Transformer."""

__version__ = "0.1.0"

# The study-level column order, re-exported from its owner (vit_spine.schema) under its public names.
from vit_spine.schema import STUDY_TARGETS, VERTEBRAE

__all__ = ["STUDY_TARGETS", "VERTEBRAE", "__version__"]

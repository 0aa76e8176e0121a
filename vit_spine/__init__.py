"""vit-spine: cervical spine fracture detection on CT (RSNA 2022 layout) with a Vision Transformer."""

__version__ = "0.1.0"

# Column order used everywhere a study-level prediction or label vector appears.
VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
STUDY_TARGETS = ("patient_overall", *VERTEBRAE)

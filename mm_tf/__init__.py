"""mm-tf: Mix-and-Match tuning for self-supervised semantic segmentation (TF/Keras)."""

__version__ = "0.1.0"

"""purer-mlops: PURER data-free meta-learning (CVPR 2023) as a DVC + MLflow pipeline."""

__version__ = "0.1.0"

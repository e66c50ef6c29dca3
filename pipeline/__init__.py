"""Image-classification training pipeline: WebDataset shards → DALI/torch loaders → Ray Train DDP → MLflow."""

__version__ = "0.1.0"

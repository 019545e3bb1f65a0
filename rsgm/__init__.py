"""rsgm: reliable and safe generative models as PyTorch Lightning modules."""

__version__ = "0.1.0"

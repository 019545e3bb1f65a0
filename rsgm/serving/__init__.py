"""HTTP serving of a B4B-defended encoder (``rsgm serve --config configs/b4b_serve.yaml``)."""

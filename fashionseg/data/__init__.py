"""Data: formats users bring (Kaggle CSV, COCO JSON), the shards we write, and the loader."""

"""fashionseg: distributed Mask R-CNN training for fashion instance segmentation."""

__version__ = "0.1.0"

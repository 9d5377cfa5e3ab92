"""PyTorch modules of the two-stream segmenter: image branch, range branch, point sampling, fusion."""

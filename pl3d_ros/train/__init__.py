"""Supervised source training: augmentations and the training loop."""

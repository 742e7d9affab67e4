"""Metrics of generated content: classifiers that judge images, and image statistics."""

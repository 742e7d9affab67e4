"""Data sources: readers that turn real formats into tokens or tensors, and tokenizers."""

"""Checkpoint loading, quantization, export and the bundle format."""

"""Backends, sampling and the pipelined decode loop."""

BACKENDS = ("torch", "coreai")  # what runs a bundle: its PyTorch graph, or its .aimodel on Core AI

"""The engine: a `Request` in, `Output`s out (request.py, engine.py), on a backend (backend.py), one request
at a time or batched (scheduler.py, batching.py)."""

BACKENDS = ("torch", "coreai")  # what runs a bundle: its PyTorch graph, or its .aimodel on Core AI

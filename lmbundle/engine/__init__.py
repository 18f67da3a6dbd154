"""Backends, sampling and the pipelined decode loop."""

"""Numeric gates against the fp32 transformers oracle."""

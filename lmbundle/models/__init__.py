"""Graph definitions, one per architecture, shared by every backend and the exporter."""

"""The bundle: its format and how it is read back (graph, vision encoder, Core AI asset cache).

Sits between the models and everything that uses bundles: convert writes them, the engine and the
gates read them; nothing here imports those.
"""

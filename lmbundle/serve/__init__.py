"""OpenAI-compatible HTTP server and web chat page, protocol only: app.py (routes, error handlers, lifespan),
schemas.py and protocol.py (JSON -> the engine's Request), replies.py (its Outputs -> JSON, streamed or whole),
tools.py (reasoning and tool calls), guard.py (key, Host, media type), worker.py (queue and worker threads),
images.py (image URLs), metrics.py (/health, /metrics)."""

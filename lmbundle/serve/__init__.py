"""OpenAI-compatible HTTP server and web chat page."""

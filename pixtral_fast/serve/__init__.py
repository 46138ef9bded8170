"""The OpenAI-compatible HTTP layer over runtime.AsyncEngine."""

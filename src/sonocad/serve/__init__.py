"""The web page and JSON API over a finished run (FastAPI)."""

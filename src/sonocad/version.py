"""sonocad's version, recorded in every run's config (kept apart from the front door so that no layer imports it)."""
__version__ = "0.2.0"

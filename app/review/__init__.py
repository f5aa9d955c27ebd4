"""Quarantine review and replay: the Kafka-backed store, the worker's web page and JSON API.

The decisions are pure data (byzguard.review); this package reads and writes them on Kafka (store.py) and
serves them over HTTP from every worker (web.py). The CLI is app/cli_quarantine.py.
"""

from app.review.store import ActionReport, ReviewStore, decisions_topic_name

__all__ = ["ActionReport", "ReviewStore", "decisions_topic_name"]

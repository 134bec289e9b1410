"""``semifer serve``: a local web app for photos, videos, the webcam and training runs.

FastAPI + uvicorn serving one plain HTML/JS/CSS page from this package (``static/``):
nothing is fetched from elsewhere at run time. Photos and videos go through
:func:`semifer.infer.run.predict_media` (the CSV is ``semifer predict``'s); runs are read
from their ``metrics.jsonl`` (:mod:`semifer.serve.runs`). See docs/web.md.
"""
from __future__ import annotations

from semifer.serve.app import create_app, serve

__all__ = ["create_app", "serve"]

"""Serving the IRG generator: the HTTP API (no Ray) used by the Ray Serve application in ``serve_apps/``."""

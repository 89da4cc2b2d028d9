"""Ray Serve applications (``serve run serve_apps.irg_app:app model=...``)."""

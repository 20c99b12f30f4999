"""The main job end to end: calibrate, serve, enrol tenants, query, monitor (``python -m demo``)."""

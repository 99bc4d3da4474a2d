"""The web process: the HTTP API for host applications (/api/v1), the operator console (/),
/metrics for Prometheus, /health for the platform, and the URL Bouncer calls when a batch is
done. One APIFlask application (Flask, with OpenAPI made from the routes' own schemas), served
by waitress (server.py)."""
from bouncer.web.application import create_web_app

__all__ = ["create_web_app"]

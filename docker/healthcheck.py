#!/usr/bin/env python3
"""Container health probe for esp-serve: exit 0 when GET /health answers 200, else 1.

Used by the images' HEALTHCHECK (Docker has no HTTP probe of its own and the slim base image has
no curl). /health answers 503 while the model loads and when the engine worker has stopped, so a
container is "starting" during the first load and "unhealthy" once the engine is gone.

Environment:
  ESP_SERVE_HEALTH_URL      full URL to probe (default http://127.0.0.1:$ESP_SERVE_PORT/health)
  ESP_SERVE_PORT            port esp-serve listens on (default 8000; set it when you pass --port)
  ESP_SERVE_HEALTH_TIMEOUT  seconds to wait for the answer (default 4)
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def probe_url() -> str:
    explicit = os.environ.get("ESP_SERVE_HEALTH_URL")
    if explicit:
        return explicit
    return f"http://127.0.0.1:{os.environ.get('ESP_SERVE_PORT', '8000')}/health"


def main() -> int:
    url = probe_url()
    timeout = float(os.environ.get("ESP_SERVE_HEALTH_TIMEOUT", "4"))
    # No proxy: the probe talks to the container itself, whatever http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as reply:
            status = reply.status
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url} answered HTTP {exc.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

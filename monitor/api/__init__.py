"""The HTTP API (``agent-monitor serve``): invariant-server and invariant-ai compatible stateless
checks on the incremental engine, and the stateful monitor through Kafka for agents that speak
HTTP. See :mod:`monitor.api.app` for the endpoints, :mod:`monitor.api.security` for keys, limits
and rate limits.

Needs the ``http`` extra (``pip install 'agent-monitor[http]'``): FastAPI and uvicorn.
"""

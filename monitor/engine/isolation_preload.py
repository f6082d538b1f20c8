"""Imported by the fork server of the engine processes (:mod:`monitor.engine.isolation`): it loads
invariant-ai and parses the registered policies once, so that every child forked from it starts
ready."""

from monitor.engine.isolation import _preload

_preload()

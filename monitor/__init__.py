"""agent-monitor: a Kafka-native guardrail monitor for AI agents.

Agents publish :class:`~monitor.models.EventBatch` records to ``agent.events``; a stateful worker
runs an Invariant policy on each batch and publishes a :class:`~monitor.models.Verdict` per batch
and an :class:`~monitor.models.Alert` per violation.
"""

__version__ = "0.1.0"

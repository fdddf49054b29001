"""Escalation alerts: the rule, its events in Redis, and webhooks that deliver them.

- `EscalationConfig` / `EscalationRule` (rule.py): when a watched speaker has been negative long
  enough to raise an alert, and when it clears (hysteresis); pure Python, the reference.
- `AlertEngine` (engine.py): ``await engine.on_final_committed(record) -> list[AlertEvent]`` applies
  the rule to a committed final atomically in Redis and stores the events per conversation.
- `WebhookDispatcher` (webhooks.py): signed JSON POSTs per event, retries with backoff, a
  dead-letter list; fed by the engine's outbox (``AlertEngine(..., outbox=True)``).

docs/alerts.md describes the rule, the events and the webhook requests.
"""

from tracker.alerts.engine import AlertEngine, Committed, SyncAlertEngine
from tracker.alerts.rule import AlertEvent, EscalationConfig, EscalationRule, SpeakerAlertState, alert_id
from tracker.alerts.webhooks import (Delivery, WebhookConfig, WebhookDispatcher, WebhookEndpoint, sign,
                                     verify_signature)

__all__ = ["AlertEngine", "AlertEvent", "Committed", "Delivery", "EscalationConfig", "EscalationRule", "SpeakerAlertState",
           "SyncAlertEngine", "WebhookConfig", "WebhookDispatcher", "WebhookEndpoint", "alert_id", "sign",
           "verify_signature"]

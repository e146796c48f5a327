"""Webhooks that are never lost: the outbox in Redis, the dispatcher that claims due events, the sender
that signs and POSTs one attempt, and the service that ties them to tasks.

- ``outbox``: the event format (what the store writes with a status change) and every outbox script;
- ``sender``: one signed POST through the address guard;
- ``dispatcher``: claims due events and enqueues their deliveries;
- ``service``: what the API and the workers do with webhooks (subscribe, deliver, redeliver).

How delivery works, step by step, is in ``service.py``; the keys are drawn in ``services/keys.py``.
"""

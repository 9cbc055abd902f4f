"""Webhooks: registering them and the per-job webhook (service.py), safe target URLs (targets.py), queued
deliveries and the sender thread (delivery.py), signatures (signing.py)."""

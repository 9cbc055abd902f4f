"""Shared by every part of the API and the worker: settings (config), the database (db), the ORM tables (tables),
API errors (errors), JSON logging (logging), HTTP hardening (security) and API keys (auth)."""

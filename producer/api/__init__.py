"""The HTTP API (`imgq api`): jobs, results, images and search for content systems, per tenant.

``create_app(settings)`` in ``app.py`` builds it; docs/api.md describes it."""

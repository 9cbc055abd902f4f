"""The HTTP surface: routes/ (one module per resource), the wire schemas (schemas.py, no ORM import), rows to
wire bodies (views.py), the FastAPI dependencies (dependencies.py), /docs (docs.py) and Prometheus (prometheus.py)."""

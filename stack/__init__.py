"""The team stack: PostgreSQL, an S3 object store (SeaweedFS), an MLflow tracking server and a
Prefect server with a process work pool and its workers, started on one machine by ``llm stack up``.

Every service is a real server on 127.0.0.1 with its data under one stack directory (see
``stack.settings``); ``llm stack env`` prints what a client exports to use them. docs/team.md
describes the parts and what to change for real hosts.
"""

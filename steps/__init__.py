"""Pipeline steps: one module per DVC stage, each a typed function plus ``python -m steps.<name>``."""

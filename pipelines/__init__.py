"""Prefect flows over the DVC stages (pipelines -> steps -> llmcore)."""

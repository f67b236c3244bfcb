"""Serving the pipeline's models over HTTP: OpenAI-compatible generation, classification, a chat page.

``python -m serving`` (or ``llm serve``) loads the models and runs uvicorn; ``serving.app.create_app``
builds the FastAPI app; ``serving.engine`` batches generation over llmcore's KV cache. Unlike
``llmcore``, this package depends on FastAPI and uvicorn (and on MLflow for ``models:/`` URIs).
"""

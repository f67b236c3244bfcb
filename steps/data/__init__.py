"""The stages' data readers: the corpus, the fine-tuning datasets, preference pairs, your own files,
token shards and the pretraining windows, read as the data stages wrote them.

Nothing here is a stage: every module directly under ``steps/`` is one DVC stage
(``python -m steps.<name>``), and no stage imports another. These readers import llmcore and the
platform (``llmpipe``) only.
"""

"""The ``llm`` command (``cli/llm.py``): the pipeline's models from the terminal, and the entry to
serving, the team stack and the experiment tools. It sits above every other package: it may import
llmcore, the platform (``llmpipe``), serving, pipelines and stack; nothing imports it.
"""

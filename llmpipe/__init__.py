"""The shared platform of the pipeline: what the stages, serving and the flows share.

One job per module: ``params`` (params.yaml sections as pydantic models), ``secrets``, ``io``
(atomic outputs, digests, resumable states), ``cli`` (the stage runner every ``python -m steps.<name>``
is), ``tracking`` (MLflow), ``registry`` (the champion policy), ``stats`` and ``scoring`` (intervals,
paired tests, classification metrics), ``plotting``, ``distributed`` (torchrun), ``training`` (the
stage around llmcore's loop), ``models`` and ``model_dirs`` (model directories), ``mlflow_models``
(the pyfuncs), ``judge`` and ``data`` (the data error type and the tokenizer params).

It imports llmcore and nothing else of this project: never a stage, ``steps.data``, serving,
pipelines, stack or cli (tests/test_layering.py).
"""

"""What the stages share: params, files, tracking, the registry, plots, distributed runs, the judge.

Nothing here is a stage: every module directly under ``steps/`` is one DVC stage
(``python -m steps.<name>``), and no stage imports another.
"""

"""Sweeps: many ``seedbed train`` runs from one file, in an Optuna study (``spec``: the file,
``runner``: running its trials, ``leaderboard``: their tables and Pareto plots)."""

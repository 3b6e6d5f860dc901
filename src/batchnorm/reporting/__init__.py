"""Plots and reports drawn only from a run's files (``config.json``, ``env.json``, ``metrics.jsonl``).

Library code never imports this package; the experiments write the files, this reads them.
"""

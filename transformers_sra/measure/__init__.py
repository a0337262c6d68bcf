"""Layer 4, evaluation: measuring a model, comparing with the baselines, results files, tasks, metrics."""

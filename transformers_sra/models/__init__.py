"""Layer 1, model plumbing: the only place that knows model families (writers, probing, touching a weight)."""

"""Layer 3, the method: extraction, atoms, directions, the bake, search, mining, baselines and the pipeline."""

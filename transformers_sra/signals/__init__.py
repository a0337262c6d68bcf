"""Layer 2, reading a model: decoding, the judge, log-probabilities, NLL and KL (what method and evaluation measure with)."""

"""Scores of a trained model: a split's terms, the importance-weighted likelihood, posterior
diagnostics, the disentanglement metrics."""

"""Evaluation: embed eval sets, metrics (math only), reports, the model card."""

"""Evaluation plane: local `evaluate` metrics (metrics/), generation and scoring helpers, report building."""

"""Synthetic worlds that a small LaVIT can learn on a CPU: used by the demo recipe, the evaluation and the tests."""

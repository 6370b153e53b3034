"""Retrieval on embeddings: distances, ranked lists and the evaluation metrics.

Jitted array code only; reading embeddings and writing reports happen in the callers.
"""

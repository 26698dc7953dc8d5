"""Artifacts: pack a model into one exact-size file, and read it back."""

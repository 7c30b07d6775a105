"""Feedback: the store of turns and ratings (and, later, the compiler to training data)."""

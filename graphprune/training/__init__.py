"""The built-in training loop that drives a method's hooks, with checkpoints."""

"""Pruning methods: each is prepare passes + training hooks + finalize passes on the same core."""

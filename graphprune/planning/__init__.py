"""MACs counting and the MACs model, scores to plans, rounding, plan validation."""

"""Attack maths on tensors, with no Lightning: MIA features, scoring, statistical tests."""

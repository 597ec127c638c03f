"""Meta-learning: the meta-learners, the inversion bank, ECI meta-training and meta-testing."""

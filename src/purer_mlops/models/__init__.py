"""Network architectures (teachers and meta-model) and the stored teacher pool."""

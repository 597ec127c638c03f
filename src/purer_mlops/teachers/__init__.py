"""The teacher pool: pretraining it from meta_train classes, or importing foreign checkpoints."""

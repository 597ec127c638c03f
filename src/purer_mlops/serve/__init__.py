"""Using a trained meta-model on a user's own few-shot task: :mod:`.images` (the task's images,
read as the meta-model's dataset was), :mod:`.adapt` (meta-testing's adaptation, batched
predictions), :mod:`.pyfunc` (the same as an MLflow model)."""

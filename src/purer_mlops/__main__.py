"""``python -m purer_mlops`` (also the entry point of ``torchrun -m purer_mlops``)."""

from .cli import main

main()

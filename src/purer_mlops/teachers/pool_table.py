"""The per-teacher quality table of stage ``pretrain``, and the check that guards the pool.

Every pretraining prints the table (teacher, classes, held-out accuracy, epochs) and writes it
to ``results/pretrain/teachers.md``. A teacher whose held-out accuracy is below
``pretrain.min_accuracy`` fails the stage: a pool with a near-chance teacher would silently
give the meta-model nothing to learn from.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class TeacherRow:
    """One line of the table.

    Attributes:
        name: ``teacher_NNN``.
        arch, dataset: its architecture and dataset.
        class_ids, classes: its classes (indices into the sorted meta_train classes, names).
        accuracy: held-out accuracy of its kept epoch, percent.
        best_epoch: that epoch (from 1); epochs: epochs trained; steps: optimiser steps taken.
        restarts: new initialisations tried after a first segment near chance (``pretrain.restarts``).
    """

    name: str
    arch: str
    dataset: str
    class_ids: tuple[int, ...]
    classes: tuple[str, ...]
    accuracy: float
    best_epoch: int
    epochs: int
    steps: int
    restarts: int = 0

    def metrics(self) -> dict:
        return {"accuracy": self.accuracy, "best_epoch": self.best_epoch, "epochs": self.epochs,
                "steps": self.steps}


def _ids(ids: tuple[int, ...]) -> str:
    consecutive = list(ids) == list(range(ids[0], ids[0] + len(ids)))
    return f"{ids[0]}–{ids[-1]}" if consecutive and len(ids) > 2 else ",".join(map(str, ids))


def format_table(rows: list[TeacherRow], min_accuracy: float, names: bool = True) -> str:
    """A Markdown table of ``rows`` and a summary line; ``names`` adds the class names.

    Teachers below ``min_accuracy`` are marked ``LOW``.
    """
    head = ["teacher", "arch", "dataset", "classes", "held-out acc %", "best epoch", "epochs", "steps", "restarts"]
    if names:
        head.append("class names")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = f"{r.accuracy:.1f}" + (" LOW" if r.accuracy < min_accuracy else "")
        cells = [r.name, r.arch, r.dataset, _ids(r.class_ids), acc, str(r.best_epoch), str(r.epochs), str(r.steps),
                 str(r.restarts)]
        if names:
            cells.append(", ".join(r.classes))
        lines.append("| " + " | ".join(cells) + " |")
    accs = [r.accuracy for r in rows]
    worst = min(rows, key=lambda r: r.accuracy)
    lines.append("")
    lines.append(f"{len(rows)} teachers: held-out accuracy mean {sum(accs) / len(accs):.1f} %, "
                 f"min {worst.accuracy:.1f} % ({worst.name}); pretrain.min_accuracy = {min_accuracy:g} %.")
    return "\n".join(lines) + "\n"


def check_quality(rows: list[TeacherRow], min_accuracy: float, table_path: str,
                  augmentation: dict[str, str] | None = None) -> None:
    """Raise a :class:`UserError` naming the teachers below ``min_accuracy`` and what to change;
    ``augmentation``: per dataset, the augmentation knobs in force (named for the weak teachers' datasets)."""
    low = [r for r in rows if r.accuracy < min_accuracy]
    if not low:
        return
    shown = ", ".join(f"{r.name} ({r.dataset} classes {_ids(r.class_ids)}: {r.accuracy:.1f} %)" for r in low[:3])
    more = f" and {len(low) - 3} more" if len(low) > 3 else ""
    raise UserError(
        f"{len(low)} of {len(rows)} teachers are below pretrain.min_accuracy = {min_accuracy:g} % held-out "
        f"accuracy: {shown}{more}. models/teachers/ is left as it was; the table is in {table_path}. Train longer "
        "(raise pretrain.max_steps, pretrain.steps or pretrain.epochs), give the dataset more images per class, "
        f"{_augmentation_hint(low, augmentation or {})}make the teachers' task easier (lower way_pretrain); to "
        "accept these teachers, lower pretrain.min_accuracy."
    )


def _augmentation_hint(low: list[TeacherRow], augmentation: dict[str, str]) -> str:
    """``check that ... (now glyphs: augment.flip=off, ...), `` for the weak teachers' datasets, or nothing."""
    shown = [f"{d}: {augmentation[d]}" for d in dict.fromkeys(r.dataset for r in low) if d in augmentation]
    if not shown:
        return "or "
    return ("check that the augmentation keeps a class (set augment.flip or augment.recolour off where a mirrored "
            f"or recoloured image is no longer of its class; now {'; '.join(shown)}), or ")

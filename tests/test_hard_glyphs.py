"""scripts/hard_glyphs.py, the harder glyph set of docs/teachers.md: the seed's layout, disjoint
classes drawn by every face, images that depend on their seed only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import REPO
from PIL import Image

SCRIPT = REPO / "scripts" / "hard_glyphs.py"


def test_the_hard_set_is_laid_out_like_the_seed_and_reproducible(tmp_path: Path) -> None:
    for out in ("a", "b"):
        subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / out), "--images-per-class", "2"], check=True,
                       capture_output=True, text=True)
    splits = {s: sorted(p.name for p in (tmp_path / "a" / s).iterdir()) for s in ("meta_train", "meta_val",
                                                                                   "meta_test")}
    assert [len(c) for c in splits.values()] == [64, 16, 20]
    assert len(set().union(*splits.values())) == 100  # no class in two splits
    files = sorted((tmp_path / "a").glob("*/*/*.png"))
    assert len(files) == 200
    for f in files[:10]:
        pixels = np.asarray(Image.open(f))
        assert pixels.shape == (32, 32, 3) and pixels.std() > 5  # drawn, not blank
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()

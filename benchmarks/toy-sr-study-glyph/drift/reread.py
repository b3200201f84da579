"""Issue 28's grid, drift re-read: the SAME fine-tuned SR exports as ../run.sh made (one folder per seed,
GRID/seedS/train/seedS/augN/export), sampled again with the same seeds and no training, with the ring-gated
drift reader (cascade/toy/glyph_read.py) and two control readers: the continuous F score and the mirrored F's.
Every column the first run had reproduces to 0 difference (checked in the note). Run from the repo root:
  python benchmarks/toy-sr-study-glyph/drift/reread.py GRID OUT   (about 9 minutes on one core)
then: python scripts/merge_study_sr.py OUT/seed0 OUT/seed1 OUT/seed2 --reference base
      python benchmarks/toy-sr-study-glyph/drift/controls.py OUT"""
import sys
from pathlib import Path

from cascade.cli.main import main
from cascade.toy import glyph_read, measure

extras = measure.study_extras


def with_controls(req, *args, **kwargs):
    req = extras(req, *args, **kwargs)
    req.readers = {**req.readers, "glyph_score": glyph_read.glyph_score,
                   "glyph_mirrored": lambda im: glyph_read.glyph_score(im, mirrored=True)}
    return req


measure.study_extras = with_controls
grid, out = Path(sys.argv[1]), Path(sys.argv[2])
for s in (0, 1, 2):
    t = grid / f"seed{s}" / "train" / f"seed{s}"
    rc = main(["study-sr", "--config", "toy", "--subject", str(grid / "subject"), "--class-noun", "toy",
               *[x for a in ("aug0", "aug250", "aug500") for x in ("--sr", f"{a}={t / a / 'export'}")],
               "--noise-levels", "0,20,500", "--seeds", str(s), "--stage1", "none", "--num-stage1", "0",
               "--class-images", "0", "--max-images", "5", "--dino", "none", "--output", str(out / f"seed{s}"),
               "--set", "stage2.sample.steps=15"])
    if rc:
        sys.exit(rc)

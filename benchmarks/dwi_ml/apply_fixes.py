"""Apply, in a dwi_ml checkout at commit a1ee02d4, the five small edits it needs to run on torch 2.13.

    python benchmarks/dwi_ml/apply_fixes.py /work/dwi_ml_src

Each edit replaces a short fragment of one line (or adds a guard) and is described in words below; no other
dwi_ml code is shipped here. Rerunning is safe: an edit already made is reported and skipped, and a file
that matches neither the original nor the edited fragment is an error (another commit: check it by hand).
"""

import sys
from pathlib import Path

PACKAGE = Path("src") / "dwi_ml"

# (file under src/dwi_ml, what and why, original fragment, edited fragment)
FIXES = [
    ("general/training/batch_samplers.py",
     "The batch sampler calls torch's Sampler.__init__ with an argument (None) that torch 2.13 no longer "
     "accepts: call it without arguments.",
     "super().__init__(None)",
     "super().__init__()"),
    ("general/models/main_models/main_models.py",
     "The number of input features read from the hdf5 is a numpy int64, which torch 2.13's GRU/LSTM "
     "constructors refuse as a size: store it as a Python int.",
     "self.nb_features = nb_features\n",
     "self.nb_features = int(nb_features)\n"),
    ("projects/Learn2track/learn2track_model.py",
     "faster_unpack_sequence increments its index array in place after it was used to index the packed data; "
     "autograd keeps a view of that index for backward, so gradients go to the wrong rows (forward values "
     "stay right and training silently stalls). Increment out of place.",
     "        ind += 1\n        line = packed_sequence.data[ind]",
     "        ind = ind + 1\n        line = packed_sequence.data[ind]"),
    ("projects/Learn2track/learn2track_tracker.py",
     "prepare_backward re-runs the model on the forward halves to rebuild the hidden states; when every line "
     "was rejected (all still single seeds) the batch is empty and the model crashes: return early.",
     "        lines, rej_idx = super().prepare_backward(lines)\n\n        logger.debug(\"Computing hidden",
     "        lines, rej_idx = super().prepare_backward(lines)\n        if len(lines) == 0:\n"
     "            return lines, rej_idx\n\n        logger.debug(\"Computing hidden"),
    ("general/tracking/tracker.py",
     "The tracker propagates the backward halves even when no line is left after the rejections, which "
     "crashes on the empty batch: skip the propagation then.",
     "                seeds = [s for i, s in enumerate(seeds) if i not in rej_idx]\n"
     "            lines = self._propagate_multiple_lines(lines)",
     "                seeds = [s for i, s in enumerate(seeds) if i not in rej_idx]\n"
     "            if len(lines) > 0:\n"
     "                lines = self._propagate_multiple_lines(lines)"),
]


def apply_fix(root: Path, relative: str, original: str, edited: str) -> str:
    path = root / PACKAGE / relative
    text = path.read_text()
    if text.count(original) == 1:
        path.write_text(text.replace(original, edited))
        return "applied"
    if original not in text and edited in text:
        return "already applied"
    raise SystemExit(f"{path}: the fragment to edit is not found exactly once (not commit a1ee02d4?)")


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: apply_fixes.py DWI_ML_CHECKOUT")
    root = Path(sys.argv[1])
    if not (root / PACKAGE).is_dir():
        raise SystemExit(f"{root}: not a dwi_ml checkout (no {PACKAGE})")
    for relative, why, original, edited in FIXES:
        print(f"{apply_fix(root, relative, original, edited):>15}: {relative}")


if __name__ == "__main__":
    main()

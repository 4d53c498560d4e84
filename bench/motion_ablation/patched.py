"""patched.py train|export|ev ARGS: apply the experiment patches named in $PATCH (comma list), then run
trainer.train, trainer.export or ev.py in this process, so the patched model is the one trained and sampled.

The patches are experiments for docs/motion.md, not options of the package: each module's docstring
says what it changes; the environment variables each reads are listed there.
"""

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
ORDER = ["meanpool", "cgate", "onehot", "dyn", "rinit", "bilin", "osign", "cfilm", "lsign", "motion"]


def main() -> int:
    wanted = [p for p in os.environ.get("PATCH", "").split(",") if p]
    unknown = sorted(set(wanted) - set(ORDER))
    if unknown:
        raise SystemExit(f"unknown patch(es) {unknown}; known: {ORDER}")
    for name in ORDER:
        if name in wanted:
            importlib.import_module(f"bench.motion_ablation.{name}").apply()
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "export":
        from trainer.export import main as run
    elif mode == "train":
        from trainer.train import main as run
    elif mode == "ev":
        from bench.motion_ablation.ev import main as run
    else:
        raise SystemExit(f"mode must be train, export or ev, not {mode!r}")
    return run(args) or 0


if __name__ == "__main__":
    sys.exit(main())

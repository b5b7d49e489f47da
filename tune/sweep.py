"""Ray Tune + Optuna sweep over ROCO subset size and LoRA rank (search spaces: tune/<preset>.yaml).

    python tune/sweep.py --preset tiny
    ray job submit --working-dir . -- python tune/sweep.py --preset paper stage1.data.path=/data/roco ...

Re-running the same command continues an interrupted sweep. Same as ``medvqa sweep run``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from medvqa.cli import app

if __name__ == "__main__":
    app(["sweep", "run", *sys.argv[1:]], prog_name="tune/sweep.py")

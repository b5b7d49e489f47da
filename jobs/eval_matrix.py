"""Evaluation matrix of a trained run: base / single-stage / two-stage x true / swapped / expert / Med-HALT (/ ood),
one Ray Data batch-inference job, written to RUN_DIR/eval/ (predictions and metrics.json). Settings: eval.* overrides
(`medvqa config --docs`). Re-running skips what was predicted with the same settings. Same as `medvqa eval`.

    python jobs/eval_matrix.py RUN_DIR                                   # local Ray
    python jobs/eval_matrix.py RUN_DIR --single-stage OTHER_RUN_DIR eval.medhalt_path=../shared/data/medhalt/reasoning_fake.csv
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/eval_matrix.py RUN_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from medvqa.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["eval", *sys.argv[1:]])

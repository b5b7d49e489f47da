"""Evaluation matrix of a trained run: base / single-stage / two-stage x true / swapped / expert / Med-HALT (/ ood),
one Ray Data batch-inference job per model, written to RUN_DIR/eval/ (predictions/<model>/<condition>.parquet and
metrics.json). Re-running skips the cells already predicted. Options: `medvqa eval --help`.

    python jobs/eval_matrix.py RUN_DIR                                   # local Ray
    python jobs/eval_matrix.py RUN_DIR --single-stage OTHER_RUN_DIR --medhalt ../shared/data/medhalt/reasoning_fake.csv
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/eval_matrix.py RUN_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from medvqa.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["eval", *sys.argv[1:]])

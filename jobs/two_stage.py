"""Two-stage QLoRA fine-tuning of Idefics2 for medical VQA (stage 1 captioning, stage 2 VQA) on Ray.

    python jobs/two_stage.py                                    # tiny model, phantom data, local Ray
    python jobs/two_stage.py --preset paper stage1.data.path=/data/roco stage2.data.path=/data/vqa_rad
    python jobs/two_stage.py run.tracking=mlflow                # and MLflow ($MLFLOW_TRACKING_URI or runs/mlflow.db)
    python jobs/two_stage.py --verbose                          # Ray's output on the terminal too (else in logs/)
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/two_stage.py --preset paper

Re-running the same command resumes the same run (the run id is a hash of the config and seed). The terminal shows a
progress bar per stage; everything else goes to RUN_DIR/logs/train.log.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from medvqa.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])

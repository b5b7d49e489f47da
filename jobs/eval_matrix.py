"""Evaluation matrix of a trained run: base / single-stage / two-stage × true / swapped / expert / Med-HALT (/ ood),
one Ray Data batch-inference job per model, written to RUN_DIR/eval/ (predictions/<model>/<condition>.parquet and
metrics.json). Re-running skips the cells already predicted.

    python jobs/eval_matrix.py RUN_DIR                                   # local Ray
    python jobs/eval_matrix.py RUN_DIR --single-stage OTHER_RUN_DIR --medhalt data/medhalt/reasoning_fake.csv
    python jobs/eval_matrix.py RUN_DIR --base-only resources.use_gpu=true
    ray job submit --working-dir . -- python jobs/eval_matrix.py RUN_DIR

Trailing ``key=value`` arguments override the run's config.yaml (e.g. resources.*); model.* must stay as trained.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="Two-stage run directory (has config.yaml and adapters/).")
    p.add_argument("--single-stage", default=None, help="Run directory of the single-stage baseline.")
    p.add_argument("--base-only", action="store_true", help="Evaluate only the base model.")
    p.add_argument("--conditions", default="true,swapped,expert,medhalt", help="Comma-separated conditions.")
    p.add_argument("--medhalt", default=None, help="Med-HALT reasoning_fake.csv (medhalt is skipped without it).")
    p.add_argument("--medhalt-limit", type=int, default=100)
    p.add_argument("--ood", action="store_true", help="Add the ood condition (phantom runs: phantoms, another seed).")
    p.add_argument("--ood-path", default=None, help="PathVQA test source for the ood condition.")
    p.add_argument("--test-limit", type=int, default=None, help="Seeded subset of the test split.")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=2, help="Predictor actors.")
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")

    from medvqa.cli import setup_logging
    from medvqa.evaluate import evaluate_run

    setup_logging()
    out = evaluate_run(args.run_dir, single_stage=args.single_stage, base_only=args.base_only, overrides=overrides,
                       conditions=[c for c in args.conditions.split(",") if c], test_limit=args.test_limit,
                       medhalt_path=args.medhalt, medhalt_limit=args.medhalt_limit, ood=args.ood,
                       ood_path=args.ood_path, max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                       cpus_per_actor=args.cpus_per_actor)
    print(json.dumps({"metrics": out["metrics_path"], "predicted": out["predicted"], "skipped": out["skipped"]}))


if __name__ == "__main__":
    main()

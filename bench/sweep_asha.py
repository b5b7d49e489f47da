"""Compute saved by ASHA early stopping vs running every trial to its full budget, and whether both find the same
best configuration.

    python bench/sweep_asha.py [--trials 8] [--space tiny]

Runs the search space twice on a fresh local Ray: once with the space's ASHA rule, once with ``asha: null`` (every
trial to full budget). ``tpe_startup_trials`` is set to the number of trials, so Optuna's seeded sampler proposes the
same configurations in both sweeps (TPE's model would otherwise react to the different early-stopped results), which
makes the two directly comparable. Prints, per sweep: wall time, trial-seconds (sum of Tune's ``time_total_s`` of
each trial's last result), stage-2 validation rounds run, trials completed/stopped, and the best cell; then the
ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def run(space_name: str, trials: int, asha: bool, out: str) -> dict:
    from medvqa.sweep import load_space, run_sweep
    from medvqa.sweep_report import load_trials, write_report

    changes = {"num_samples": trials, "tpe_startup_trials": trials, "output_dir": out}
    if not asha:
        changes["asha"] = None
    space = load_space(space_name, changes)
    t0 = time.perf_counter()
    sdir = run_sweep(space, report=False)
    wall = time.perf_counter() - t0
    report = write_report(sdir)
    _, df, _ = load_trials(sdir)
    return {"wall_s": wall, "trial_s": float(df["seconds"].sum()), "rounds": int(df["val_round"].sum()),
            "completed": report["status"]["completed"], "stopped": report["status"]["stopped"],
            "best": report["best"], "configs": sorted(str(sorted((k, df.loc[i, k]) for k in space.params))
                                                      for i in df.index), "dir": str(sdir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--space", default="tiny")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = tempfile.mkdtemp(prefix="bench_sweep_")
    results = {}
    for label, asha in (("asha", True), ("full", False)):
        results[label] = r = run(args.space, args.trials, asha, out)
        best = r["best"] or {}
        print(f"{label}: wall {r['wall_s']:.0f} s, trial-seconds {r['trial_s']:.0f}, validation rounds {r['rounds']}, "
              f"{r['completed']} completed / {r['stopped']} stopped; best {best.get('params')} "
              f"{best.get('mean', float('nan')):.3f} ({r['dir']})", flush=True)
    a, f = results["asha"], results["full"]
    print(f"same configurations proposed: {a['configs'] == f['configs']}")
    print(f"ASHA / full: trial-seconds {a['trial_s'] / f['trial_s']:.2f}x, rounds {a['rounds'] / f['rounds']:.2f}x, "
          f"wall {a['wall_s'] / f['wall_s']:.2f}x (compute saved: {1 - a['trial_s'] / f['trial_s']:.0%})")
    same = (a["best"] or {}).get("params") == (f["best"] or {}).get("params")
    print(f"same best configuration: {same} (asha {(a['best'] or {}).get('params')}, "
          f"full {(f['best'] or {}).get('params')})")


if __name__ == "__main__":
    main()

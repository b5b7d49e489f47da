"""Peak memory of a streamed stage at 1k vs 20k records (target: <= 1.2x).

    python bench/stream_memory.py [--small 1000] [--large 20000]

Each size runs in a fresh process: prepare (validate -> parquet) and stream every record through the
preprocessing into micro-batches, as a training stage does. The figure is the peak PSS of the whole process tree
(driver, Ray workers, object store), so a pipeline that materialised the data set would grow with it. The object
store is capped (--object-store-mb, as a cluster node's would be): its pages, once touched, stay resident, so an
uncapped store's footprint follows how much data has flowed through it rather than what is held at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def one(records: int, object_store_mb: int, buffer_mb: int) -> dict:
    import shutil
    import tempfile
    import time

    from common import TreeMemory, start_ray
    from medvqa.config import load_config
    from medvqa.data.pipeline import cached_processor, collate_fn_for, prepare_records, training_dataset
    from medvqa.model import resolve_model_path

    cfg = load_config("tiny", [f"stage2.data.num_records={records}", f"resources.data_buffer_mb={buffer_mb}"])
    model_path = resolve_model_path(cfg.model)
    processor = cached_processor(model_path, False, None)
    start_ray(object_store_mb=object_store_mb)
    work = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    with TreeMemory() as mem:
        prepare_records(cfg.stage2.data, work / "data", work / "rejects", cfg.resources, 0.0)
        ds = training_dataset(work / "data", cfg.stage2, model_path, cfg.resources)
        n = sum(b["input_ids"].shape[0] for b in ds.iter_torch_batches(batch_size=4,
                                                                          collate_fn=collate_fn_for(processor)))
    shutil.rmtree(work, ignore_errors=True)
    return {"records": records, "streamed": n, "peak_pss_mib": mem.peak / 2**20, "processes_at_peak": mem.peak_processes,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--object-store-mb", type=int, default=512)
    ap.add_argument("--buffer-mb", type=int, default=64, help="resources.data_buffer_mb")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.object_store_mb, args.buffer_mb)))
        return
    results = []
    for n in (args.small, args.large):
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--object-store-mb", str(args.object_store_mb),
                              "--buffer-mb", str(args.buffer_mb)], capture_output=True, text=True,
                             cwd=Path(__file__).parent)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in results:
        print(f"{r['records']:>6} records: streamed {r['streamed']:>6}  peak PSS {r['peak_pss_mib']:7.0f} MiB  "
              f"{r['seconds']:6.1f} s  ({r['processes_at_peak']} processes at the peak)")
    print(f"object store capped at {args.object_store_mb} MiB; Ray Data in-flight buffer "
          f"(resources.data_buffer_mb) {args.buffer_mb} MiB")
    print(f"ratio peak {args.large} / {args.small}: {results[1]['peak_pss_mib'] / results[0]['peak_pss_mib']:.2f}x  "
          f"(target <= 1.2x)")


if __name__ == "__main__":
    main()

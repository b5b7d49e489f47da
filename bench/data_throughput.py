"""Ray Data preprocessing throughput vs a per-sample collator (the study's way), same records, same processor.

    python bench/data_throughput.py [--records 512] [--longest-edge 980] [--source vqa_rad|phantom]

Per-sample collator: one process decodes each image and runs the processor sample by sample inside the training
loop (the HF fine-tuning recipe the study used). Ray Data: the same work in parallel streaming tasks
(``training_dataset``), consumed as micro-batches. Both at Idefics2-8B's image resolution (longest edge 980 px) on
real VQA-RAD images when ../shared is present (phantoms otherwise), two passes each (a pass = an epoch). Target:
>= 2x.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from common import ROOT, start_ray


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--longest-edge", type=int, default=980, help="Idefics2-8B resizes to 980 px")
    ap.add_argument("--source", choices=["vqa_rad", "phantom"], default="vqa_rad")
    ap.add_argument("--passes", type=int, default=2)
    args = ap.parse_args()

    from medvqa.config import load_config
    from medvqa.data.pipeline import (cached_processor, collate_fn_for, decode_image, prepare_records,
                                      training_dataset)
    from medvqa.prompts import prompt_text
    from medvqa.model import resolve_model_path

    shared = ROOT.parent / "shared" / "data" / "vqa_rad"
    source = args.source if shared.exists() else "phantom"
    data = (["stage2.data.kind=vqa_rad", f"stage2.data.path={shared}", f"stage2.data.limit={args.records}"]
            if source == "vqa_rad" else [f"stage2.data.num_records={args.records}"])
    cfg = load_config("tiny", data + [f"model.longest_edge={args.longest_edge}"])
    stage = cfg.stage2
    model_path = resolve_model_path(cfg.model)
    processor = cached_processor(model_path, False, args.longest_edge)
    collate = collate_fn_for(processor)

    start_ray()
    work = Path(tempfile.mkdtemp())
    try:
        prepare_records(stage.data, work / "data", work / "rejects", cfg.resources, 1.0)
        examples = [r for f in sorted((work / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]

        # The study's collator (HF Idefics2 fine-tuning recipe), in the training process: decode, chat template and
        # processor call per micro-batch, labels from input_ids.
        t0 = time.perf_counter()
        for _ in range(args.passes):
            for i in range(0, len(examples), args.batch_size):
                rows = examples[i: i + args.batch_size]
                texts = [prompt_text(processor, stage.prompt, r["prompt"]) + " " + r["target"] + "<end_of_utterance>"
                         for r in rows]
                enc = processor(text=texts, images=[[decode_image(r["image"])] for r in rows], return_tensors="pt",
                                padding=True)
                enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        per_sample = args.passes * len(examples) / (time.perf_counter() - t0)

        ds = training_dataset(work / "data", stage, model_path, cfg.resources, longest_edge=args.longest_edge)
        n, steady_rows, steady_s, first = 0, 0, 0.0, []
        t0 = time.perf_counter()
        for _ in range(args.passes):
            t_pass = time.perf_counter()
            for i, batch in enumerate(ds.iter_torch_batches(batch_size=args.batch_size, collate_fn=collate)):
                now = time.perf_counter()
                if i == 0:  # pipeline start-up of this pass (listing files, starting tasks)
                    first.append(now - t_pass)
                    t_steady = now
                else:
                    steady_rows += batch["input_ids"].shape[0]
                    steady_s = steady_s + (now - t_steady)
                    t_steady = now
                n += batch["input_ids"].shape[0]
        ray_data = n / (time.perf_counter() - t0)
        ray_steady = steady_rows / steady_s
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"source: {source}  records: {len(examples)}  longest edge: {args.longest_edge}px  passes: {args.passes}  "
          f"batch: {args.batch_size}  data tasks: {cfg.resources.data_concurrency} x "
          f"{cfg.resources.data_cpus_per_task} CPU")
    print(f"per-sample collator : {per_sample:8.1f} samples/s")
    print(f"Ray Data streaming  : {ray_data:8.1f} samples/s end to end; {ray_steady:8.1f} samples/s after each "
          f"pass's first batch (start-up {', '.join(f'{t:.1f}' for t in first)} s per pass)")
    print(f"ratio Ray Data / per-sample: {ray_data / per_sample:.2f}x end to end, {ray_steady / per_sample:.2f}x "
          f"steady state  (target >= 2x)")


if __name__ == "__main__":
    main()

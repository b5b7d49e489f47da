"""Image reliance of a fine-tuned tiny model: after a short two-stage run on phantoms (whose answers are functions of
the image), the evaluation matrix scores the ``true`` condition clearly above ``swapped``.

The phantoms here have one anatomy (``data.phantom_anatomy=ct/chest``: every image a chest CT, every question about
the lesion: presence, side, size). The swap picks another image of the same modality and organ, so with all nine
anatomies only the lesion questions can tell a reader of the image from a guesser, and a 128-step stage 2 does not
learn to read a lesion across varied anatomy (measured with the tiny v3 model, which does see the image: connector
output ~49% apart between two images; a ridge probe reads lesion side / size / presence from it at 1.0 / 0.98 / 0.86):
true 0.44 vs swapped 0.46 normalized EM (48 questions), and in-process sweeps of bigger / higher-contrast lesions,
lesion-heavy question mixes, trainable perceiver latents, more stage-1 data, lr 1e-3..1e-2 all gave a drop of ~0.00;
~512 stage-2 steps sometimes learned it, depending on the seed. With one anatomy the same short recipe learns the
lesion in-process (drop +0.44 / +0.48 at seeds 0 / 1, CI lower bounds 0.32 / 0.35). Through the Ray job with the
preset's 2 stage-2 epochs it was not enough (drop +0.06, CI [0.00, 0.13]); with 4 epochs (256 steps): true 0.729 vs
swapped 0.479 normalized EM, drop +0.25, CI [0.08, 0.42], p = 0.018 (48 questions; ~80 s for the module on 2 CPUs).
With the data shuffled every epoch (seeded) the same run scores a drop of +0.21 on those 48 questions, CI [0.00, 0.40],
p = 0.048, and +0.23, CI [0.13, 0.35], p = 0.002 on 96: 48 questions are too few for a CI that clears 0, hence 96.
This is the test's setting: it checks that the evaluation measures image reliance when a model has it; it does not
claim the tiny model reads lesions across anatomies.
"""


import pandas as pd
import pytest

from medvqa.config import load_config
from medvqa.evaluate import heldout_records, run_matrix
from medvqa.runs import read_metrics

pytestmark = pytest.mark.integration

# The tiny preset (stage 1: 192 captions x 2 epochs; stage 2: 256 questions, here 4 epochs) on one anatomy, without
# intermediate checkpoints.
TRAIN = ["run.checkpoint_every_n_steps=100000", "run.log_every_n_steps=4", "resources.num_cpus=2",
         "stage1.data.phantom_anatomy=ct/chest", "stage2.data.phantom_anatomy=ct/chest", "stage2.epochs=4"]
N_TEST = 96
EVAL = ["eval.conditions=true,swapped", "eval.seed=0", "eval.max_new_tokens=8", "eval.n_boot=500"]
MARGIN = 0.10  # normalized-EM points the true image must add over a swapped one


@pytest.fixture(scope="module")
def evaluated(ray_local, tmp_path_factory):
    from medvqa.train import run_two_stage

    cfg = load_config("tiny", TRAIN + EVAL + [f"run.output_dir={tmp_path_factory.mktemp('runs')}"])
    run_dir = run_two_stage(cfg)
    test = heldout_records(cfg.stage2.data, limit=N_TEST)
    out_dir = tmp_path_factory.mktemp("eval")
    out = run_matrix(cfg, {"two_stage": run_dir}, test, out_dir)
    return run_dir, test, out_dir, out["metrics"]


def test_the_short_run_learns(evaluated):
    run_dir, *_ = evaluated
    losses = [m["loss"] for m in read_metrics(run_dir) if m.get("stage") == "stage2" and "loss" in m]
    assert len(losses) >= 8
    assert sum(losses[-4:]) / 4 < 0.4 * losses[0], losses


def test_swapped_rows_never_show_the_true_image(evaluated):
    _, test, out_dir, metrics = evaluated
    records = {r["id"]: r for r in test}
    image_of = {r["image_id"]: r["image"] for r in test}
    cells = metrics["settings"]["cells"]["two_stage"]
    swapped, true = (pd.read_parquet(out_dir / cells[c]) for c in ("swapped", "true"))
    assert sorted(swapped["question_id"]) == sorted(records) == sorted(true["question_id"])
    for q, shown, truth in zip(swapped["question_id"], swapped["image_id_shown"], swapped["true_image_id"]):
        assert truth == records[q]["image_id"]
        assert shown != truth and shown in image_of  # another test image ...
        assert bytes(image_of[shown]) != bytes(records[q]["image"])  # ... with other pixels
    assert (true["image_id_shown"] == true["true_image_id"]).all()
    assert metrics["cells"]["two_stage"]["swapped"]["n"] == N_TEST


def test_true_image_scores_clearly_above_a_swapped_one(evaluated):
    *_, metrics = evaluated
    em = metrics["image_reliance"]["two_stage"]["normalized_em"]
    assert em["drop"] >= MARGIN and em["ci"][0] > 0, em

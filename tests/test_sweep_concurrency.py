"""How many sweep trials run at once on autoscaling clusters (issue 10, item 6): from the space, else the most the
cluster can scale to, else what is there now; never a silent guess when GPU nodes start at zero.

Unit tests use fake cluster views; one integration test publishes a cluster config through a local Ray's GCS, the
way an autoscaler does, to check the Ray API the sweep reads."""

import sys
from pathlib import Path

import pytest
import yaml

from medvqa.sweep import cluster_max_resources, launcher_max_resources, load_space, max_concurrent_trials

GPU_TEMPLATE = Path(__file__).resolve().parents[1] / "cluster" / "gpu_cluster.yaml"
HEAD_ONLY = {"CPU": 8.0, "memory": 3e10}  # what ray.cluster_resources() shows before any GPU node starts


def test_the_paper_sweep_on_the_gpu_template_runs_as_many_trials_as_gpus_it_can_scale_to():
    # The failure of the issue: the template's head has no GPU and its GPU nodes start at zero.
    maximum = launcher_max_resources(yaml.safe_load(GPU_TEMPLATE.read_text()))
    assert maximum == {"CPU": 8 + 4 * 8, "GPU": 4}  # head 8 CPUs; up to 4 g5.2xlarge workers of 8 CPUs, 1 GPU
    assert max_concurrent_trials(load_space("paper"), HEAD_ONLY, maximum) == 2  # 4 GPUs / (1 GPU x 2 seeds)
    two_gpu = load_space("paper", overrides=["resources.num_workers=2"])
    assert max_concurrent_trials(two_gpu, HEAD_ONLY, maximum) == 1


def test_without_gpus_now_or_a_known_maximum_the_sweep_says_what_to_set():
    with pytest.raises(RuntimeError) as err:
        max_concurrent_trials(load_space("paper"), HEAD_ONLY)
    for words in ("0 GPU(s) now", "no autoscaling maximum", "max_concurrent", "paper", "--max-concurrent N"):
        assert words in str(err.value)
    with pytest.raises(RuntimeError, match="at most, by its autoscaling config"):
        max_concurrent_trials(load_space("paper", overrides=["resources.num_workers=8"]), HEAD_ONLY, {"GPU": 4})


def test_an_explicit_value_wins_and_a_derived_one_is_capped_by_the_trials():
    assert max_concurrent_trials(load_space("paper", {"max_concurrent": 3}), HEAD_ONLY) == 3
    assert max_concurrent_trials(load_space("paper", {"max_concurrent": 3}), HEAD_ONLY, {"GPU": 64}) == 3
    unbounded = {"GPU": sys.maxsize}  # Ray's value for a node group without a maximum
    assert max_concurrent_trials(load_space("paper", {"num_samples": 5}), HEAD_ONLY, unbounded) == 5
    # present resources still count where no maximum is known (a fixed cluster, or GPU nodes already up)
    assert max_concurrent_trials(load_space("paper"), {"CPU": 16.0, "GPU": 4.0}) == 2


def test_launcher_maximum_fills_the_cluster_budget_with_the_richest_node_types_first():
    config = {"max_workers": 4, "head_node_type": "head",
              "available_node_types": {"head": {"resources": {"CPU": 4}},
                                       "big": {"resources": {"CPU": 8, "GPU": 2}, "max_workers": 3},
                                       "small": {"resources": {"CPU": 16, "GPU": 1}},  # max_workers: the cluster's
                                       "cpu": {"resources": {"CPU": 32}, "max_workers": 1}}}
    assert launcher_max_resources(config) == {"CPU": 4 + 32 + 3 * 16, "GPU": 3 * 2 + 1 * 1}


def test_cluster_maximum_comes_from_the_launcher_config_on_the_head(tmp_path):
    # No Ray here, so the GCS source fails and the launcher's file is read; no file: unknown.
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(GPU_TEMPLATE.read_text())
    assert cluster_max_resources(bootstrap)["GPU"] == 4
    assert cluster_max_resources(tmp_path / "absent.yaml") is None


@pytest.mark.integration
def test_cluster_maximum_published_in_the_gcs_is_read(ray_local, tmp_path):
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    absent = tmp_path / "absent.yaml"
    assert cluster_max_resources(absent) is None  # a plain ray.init(): no autoscaler, no maximum
    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, max_count=4)])
    GcsClient(address=ray.get_runtime_context().gcs_address).report_cluster_config(config.SerializeToString())
    maximum = cluster_max_resources(absent)
    assert maximum == {"CPU": 32, "GPU": 4}
    assert max_concurrent_trials(load_space("paper"), ray.cluster_resources(), maximum) == 2

"""ProjectorConfig refuses hostile sizes before anything is allocated (issue 16)."""

import time

import pytest

from hybridkernels.models.projector import ProjectorConfig


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"num_layers": 10**6}, "num_layers"),
        ({"hidden_dim": 10**9}, "hidden_dim"),
        ({"planner_dim": 10**9}, "planner_dim"),
        ({"executor_dim": 10**9}, "executor_dim"),
        ({"pool": "mean", "pool_stride": 10**12}, "pool_stride"),
    ],
)
def test_projector_config_rejects_hostile_sizes(changes, words):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=words):
        ProjectorConfig(**(dict(planner_dim=8, executor_dim=4) | changes))
    assert time.perf_counter() - t0 < 1.0


def test_projector_config_keeps_real_sizes():
    cfg = ProjectorConfig(planner_dim=4096, executor_dim=8192, num_layers=4)
    assert cfg.hidden_dim == 8192

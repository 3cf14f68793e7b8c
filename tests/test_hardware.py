"""Hardware profiles, the caps applied inside a trial, the sampler and the memory guard."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from tune_alr import hardware
from tune_alr.hardware import Profile
from tune_alr.monitor import MemoryCapExceeded, ResourceSampler


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Core locks of this test only, whatever else runs on the machine."""
    monkeypatch.setattr(hardware, "_core_lock_dir", lambda: tmp_path)
    return tmp_path


def test_builtin_profiles_map_to_ray_resources() -> None:
    edge = hardware.resolve("edge")
    assert edge.ray_resources() == {"cpu": 1.0, "gpu": 0.0, "memory": 1024 * 2**20}
    assert edge.torch_threads == 1
    slice_ = hardware.resolve("gpu-slice")
    assert slice_.ray_resources()["gpu"] == 0.25
    assert slice_.cuda_memory_fraction == 0.25
    assert hardware.resolve("laptop").torch_threads == 2


def test_specs_and_dicts_make_user_profiles() -> None:
    p = hardware.resolve("cpus=1.5,threads=1,memory_mb=512,node_type=constrained")
    assert (p.name, p.cpus, p.threads, p.memory_mb) == ("custom", 1.5, 1, 512.0)
    assert p.ray_resources()["constrained"] == hardware.NODE_TYPE_SHARE
    assert hardware.resolve("edge,memory_mb=2048").memory_mb == 2048
    assert hardware.resolve({"cpus": 2, "pin_cpus": False}).pin_cpus is False
    mine = hardware.register(Profile("tiny-box", cpus=1, memory_mb=300))
    assert hardware.resolve("tiny-box") == mine
    del hardware.PROFILES["tiny-box"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("phone", "unknown profile 'phone'; available: edge"),
        ("cpus=-1", "cpus must be a finite number >= 0, got -1.0"),
        ("cpus=nan", "cpus must be a finite number >= 0, got nan"),
        ("edge,gpus=inf", "gpus must be a finite number >= 0, got inf"),
        ("cpus=0", "needs cpus > 0 or gpus > 0"),
        ("memory_mb=0", "memory_mb must be a number of MiB > 0, got 0.0"),
        ("threads=0", "threads must be an integer >= 1, got 0"),
        ("threads=1.5", "threads must be a number, got '1.5'"),
        ("gpu_memory_fraction=2", "gpu_memory_fraction must be in (0, 1], got 2.0"),
        ("ram=4", "bad profile setting 'ram=4'; use key=value with keys name, cpus"),
        ("pin_cpus=maybe", "pin_cpus must be true or false, got 'maybe'"),
        ("node_type=CPU", "must name a custom Ray resource"),
        ({"cpus": 1, "disk": 3}, "unknown profile setting(s) ['disk']"),
    ],
)
def test_bad_profiles_are_named(spec: object, message: str) -> None:
    with pytest.raises(ValueError) as err:
        hardware.resolve(spec)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_applied_pins_threads_and_cores_then_restores_them(lock_dir: Path) -> None:
    threads_before = torch.get_num_threads()
    affinity_before = os.sched_getaffinity(0)
    with hardware.applied(Profile("one", cpus=1, threads=1, memory_mb=900)) as caps:
        assert torch.get_num_threads() == 1
        assert len(caps.cores) == 1
        assert os.sched_getaffinity(0) == set(caps.cores)
        metrics = caps.metrics()
        assert metrics["caps/threads"] == 1 and metrics["caps/memory_mb"] == 900
        assert metrics["caps/cores"] == 1 and metrics["profile"] == "one"
    assert torch.get_num_threads() == threads_before
    assert os.sched_getaffinity(0) == affinity_before


def test_concurrent_trials_never_share_a_core(lock_dir: Path) -> None:
    first, first_handles = hardware.claim_cores(1)
    second, second_handles = hardware.claim_cores(1)
    assert len(first) == 1
    allowed = len(os.sched_getaffinity(0))
    if allowed > 1:
        assert len(second) == 1 and second != first
    else:
        assert second == []  # one core only: the second trial is not pinned
    # Asking for more cores than are free claims none (and keeps none locked).
    none, handles = hardware.claim_cores(allowed)
    assert none == [] and handles == []
    for handle in first_handles + second_handles:
        handle.close()
    again, handles = hardware.claim_cores(1)
    assert again == first  # released on close
    handles[0].close()


def test_gpu_caps_are_noted_without_cuda(lock_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the no-GPU path is what is tested here")
    with hardware.applied(hardware.resolve("gpu-slice")) as caps:
        assert caps.gpu_memory_fraction is None
        assert "no CUDA device: GPU memory fraction 0.25 not applied" in caps.notes[0]


def test_sampler_figures_are_plausible_for_a_busy_loop() -> None:
    with ResourceSampler(interval=0.05) as sampler:
        sampler.snapshot()  # starts the CPU window
        deadline = time.perf_counter() + 1.0
        x = 0
        while time.perf_counter() < deadline:
            x += 1
        figures = sampler.snapshot()
    assert all(isinstance(v, float) and v == v for v in figures.values())
    # One busy Python thread: about one core (the sampler's own thread adds little).
    assert 60.0 <= figures["proc/cpu_percent"] <= 150.0
    assert 0.6 <= figures["proc/cpu_s"] <= 2.0
    assert 20.0 < figures["proc/rss_mb"] <= figures["proc/peak_rss_mb"] < 24 * 1024


def test_memory_guard_trips_on_an_allocation_past_the_cap() -> None:
    baseline = ResourceSampler().sample()
    with ResourceSampler(memory_limit_mb=baseline + 100, interval=0.02, profile="p") as sampler:
        sampler.check()  # under the cap: nothing
        hog = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched
        deadline = time.perf_counter() + 5
        while sampler.exceeded is None and time.perf_counter() < deadline:
            time.sleep(0.02)
        with pytest.raises(MemoryCapExceeded, match=r"exceeded its memory cap: resident memory"):
            sampler.check()
        assert "(profile 'p')" in str(sampler.exceeded)
        assert sampler.snapshot()["proc/peak_rss_mb"] > baseline + 250
        del hog


@pytest.mark.slow
def test_a_trial_past_its_memory_cap_errors_while_its_sibling_finishes(
    ray_session: None, tmp_path: Path
) -> None:
    """Two real trials: one capped below what a worker with torch holds, one at edge's cap."""
    from ray import tune

    import trainables
    from tune_alr.report import load_trials

    base = {"task": "digits", "policy": "constant", "max_steps": 20, "report_every": 10}
    tuner = tune.Tuner(
        tune.with_resources(trainables.train, {"cpu": 1}),
        param_space={
            **base,
            "profile": tune.grid_search(
                [
                    {"name": "starved", "cpus": 1, "memory_mb": 64},
                    hardware.resolve("edge").to_dict(),
                ]
            ),
        },
        run_config=tune.RunConfig(
            name="guard",
            storage_path=str(tmp_path),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    grid = tuner.fit()
    by_profile = {r.config["profile"]["name"]: r for r in grid}
    # a cap that bites fails the trial once, without retries (trainables.ray_trainable)
    starved = by_profile["starved"].metrics
    assert starved["status"] == "failed"
    assert "exceeded its memory cap" in starved["error"]
    assert "cap 64 MiB (profile 'starved')" in starved["error"]
    assert by_profile["edge"].error is None
    assert by_profile["edge"].metrics["status"] == "finished"
    records = {r.config["profile"]["name"]: r for r in load_trials(grid.experiment_path)}
    assert records["starved"].status == "failed" and records["edge"].status == "finished"

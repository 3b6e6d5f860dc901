"""batchnorm.experiments.runs: the run-folder machinery every experiment shares.

The experiments' own tests (test_mnist.py, test_convnet.py) run it end to end; these check its
pieces directly: data order, config check, lock, checkpoints, metrics files, parallel runs.
"""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from batchnorm import runfiles
from batchnorm._atomic import write_text
from batchnorm.experiments import runs


def doc(config: dict, experiment: str = "test") -> dict:
    """A run's config.json document around ``config``."""
    return runfiles.config_document(
        experiment, config, {"name": "net"}, preset=None, versions=runs.versions()
    )


def test_derive_seed_is_stable_and_independent():
    # a fixed value: a change here would silently change every run's data order and weights
    assert runs.derive_seed(0, "init") == runs.derive_seed(0, "init")
    assert runs.derive_seed(0, "init") == 2994650953587724592
    seeds = {runs.derive_seed(s, p, i) for s in range(3) for p in ("a", "b") for i in range(5)}
    assert len(seeds) == 30 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("shuffle", ["examples", "batches"])
def test_data_order_is_a_pure_function_of_seed_and_step(shuffle):
    order = runs.DataOrder(640, 32, seed=3, shuffle=shuffle)
    seq = [order.indices(s).clone() for s in range(1, 61)]  # three epochs of 20 steps
    fresh = runs.DataOrder(640, 32, seed=3, shuffle=shuffle)
    for s in (47, 2, 20, 21, 60, 1):  # random access, as after a resume
        assert torch.equal(fresh.indices(s), seq[s - 1])
    for e in range(3):
        epoch = torch.cat(seq[20 * e : 20 * (e + 1)])
        assert sorted(epoch.tolist()) == list(range(640))  # every example once per epoch
    other = runs.DataOrder(640, 32, seed=4, shuffle=shuffle)
    assert not torch.equal(other.indices(1), seq[0])


def batch_sets(order, steps):
    return {frozenset(order.indices(s).tolist()) for s in steps}


def test_fixed_batches_keep_their_examples_together_and_thorough_shuffling_does_not():
    fixed = runs.DataOrder(640, 32, seed=0, shuffle="batches")
    assert batch_sets(fixed, range(1, 21)) == batch_sets(fixed, range(21, 41))
    assert [fixed.indices(s).tolist() for s in range(1, 21)] != [
        fixed.indices(s).tolist() for s in range(21, 41)
    ], "the order of the batches changes from epoch to epoch"
    thorough = runs.DataOrder(640, 32, seed=0, shuffle="examples")
    assert not batch_sets(thorough, range(1, 21)) & batch_sets(thorough, range(21, 41))


def test_data_order_drops_the_partial_batch_and_refuses_bad_input():
    order = runs.DataOrder(100, 32, seed=0)
    assert order.steps_per_epoch == 3
    assert len(torch.cat([order.indices(s) for s in (1, 2, 3)]).unique()) == 96
    with pytest.raises(ValueError, match="steps count from 1"):
        order.indices(0)
    with pytest.raises(ValueError, match="shuffle must be"):
        runs.DataOrder(100, 32, seed=0, shuffle="some")
    with pytest.raises(ValueError, match=r"batch_size must be in 1\.\.100"):
        runs.DataOrder(100, 101, seed=0)


def test_open_run_writes_the_config_once_and_refuses_another(tmp_path):
    run_dir = tmp_path / "run"
    with runs.open_run(run_dir, doc({"a": 1, "b": [1, 2]}), threads=1) as d:
        assert d == run_dir and torch.get_num_threads() == 1
        assert (run_dir / ".lock").exists()
    assert not (run_dir / ".lock").exists(), "the lock file goes with the lock"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"] == {"a": 1, "b": [1, 2]} and saved["versions"]["torch"]
    assert saved["experiment"] == "test" and saved["schema"] == runfiles.SCHEMA
    with runs.open_run(run_dir, doc({"a": 1, "b": [1, 2]}), threads=1):
        pass  # the same settings: resume
    before = (run_dir / "config.json").read_bytes()
    with (
        pytest.raises(runs.RunConfigMismatchError, match=r"a: saved 1, now 2; c: saved None"),
        runs.open_run(run_dir, doc({"a": 2, "b": [1, 2], "c": 0}), threads=1),
    ):
        pass
    assert (run_dir / "config.json").read_bytes() == before
    with (  # a single-process config leaves `processes` out: it still reads as 1 process
        pytest.raises(runs.RunConfigMismatchError, match=r"processes: saved 1, now 2"),
        runs.open_run(run_dir, doc({"a": 1, "b": [1, 2], "processes": 2}), threads=1),
    ):
        pass
    with (
        pytest.raises(runs.RunConfigMismatchError, match=r"another experiment \('test'\)"),
        runs.open_run(run_dir, doc({"a": 1, "b": [1, 2]}, "other"), threads=1),
    ):
        pass
    multi = tmp_path / "multi"
    with runs.open_run(multi, doc({"a": 1, "processes": 2, "bn_sync": True}), threads=1):
        pass
    with (
        pytest.raises(
            runs.RunConfigMismatchError,
            match=r"bn_sync: saved True, now None; processes: saved 2, now 1\b",
        ),
        runs.open_run(multi, doc({"a": 1}), threads=1),
    ):
        pass


def test_a_mismatch_names_each_nested_setting_once_and_skips_derived_ones(tmp_path):
    run_dir = tmp_path / "run"
    base = {"base": {"lr": 0.02, "decay": 2000}, "recipe": {"lr": 0.1, "decay": 333}}
    with runs.open_run(run_dir, doc(base), threads=1, derived=("recipe",)):
        pass
    other = {"base": {"lr": 0.05, "decay": 2000}, "recipe": {"lr": 0.25, "decay": 333}}
    with (
        pytest.raises(runs.RunConfigMismatchError) as exc,
        runs.open_run(run_dir, doc(other), threads=1, derived=("recipe",)),
    ):
        pass
    message = str(exc.value)
    assert "base.lr: saved 0.02, now 0.05" in message and message.count("saved") == 1


def test_an_older_format_is_refused_with_what_to_do(tmp_path):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"config": {"a": 1}, "versions": {}}))
    with (
        pytest.raises(runs.RunConfigMismatchError, match=r"older format.*batchnorm report"),
        runs.open_run(run_dir, doc({"a": 1}), threads=1),
    ):
        pass


def test_an_unwritable_folder_is_a_run_error_not_a_traceback(tmp_path):
    (tmp_path / "file").write_text("")
    for where in (tmp_path / "file" / "run", "/proc/batchnorm-test/run"):
        with (
            pytest.raises(runs.RunError, match="cannot write the run folder"),
            runs.open_run(where, doc({}), threads=1),
        ):
            pass


def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640


def test_open_run_clears_leftovers_of_a_hard_kill_and_restores_threads(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".checkpoint.pt.abc.part").write_bytes(b"half")
    old = torch.get_num_threads()
    with runs.open_run(run_dir, doc({}), threads=1):
        assert not list(run_dir.glob("*.part"))
    assert torch.get_num_threads() == old


def test_a_locked_run_folder_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hold = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
        "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", hold, str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout.readline().strip() == "locked"
            with (
                pytest.raises(runs.RunError, match="in use by another process"),
                runs.open_run(run_dir, doc({}), threads=1),
            ):
                pass
            assert not (run_dir / "config.json").exists()
        finally:
            holder.kill()


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    path = tmp_path / "checkpoint.pt"
    assert runs.load_checkpoint(path, 1) is None
    state = {"version": 1, "step": 5, "w": torch.arange(3.0), "metrics": [{"step": 5}]}
    runs.save_checkpoint(path, state)
    back = runs.load_checkpoint(path, 1)
    assert back["step"] == 5 and torch.equal(back["w"], state["w"])
    with pytest.raises(runs.CheckpointError, match="not a checkpoint of this program"):
        runs.load_checkpoint(path, 2)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(runs.CheckpointError, match=r"cannot be read.*Delete it"):
        runs.load_checkpoint(path, 1)
    assert path.stat().st_size == 100  # nothing deleted
    for content in (b"not a checkpoint", b""):  # torch's advice (weights_only=False) stays out
        path.write_bytes(content)
        with pytest.raises(runs.CheckpointError, match=r"cannot be read.*Delete it") as exc:
            runs.load_checkpoint(path, 1)
        assert "weights_only" not in str(exc.value) and ")." in str(exc.value)


def test_metrics_files(tmp_path):
    records = [{"step": 0, "acc": 0.1, "layer": [1, 2]}, {"step": 5, "acc": 0.5, "extra": None}]
    runs.write_metrics(tmp_path, records)
    assert runfiles.read_records(tmp_path) == (records, "metrics.jsonl")
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["step,acc,extra", "0,0.1,", "5,0.5,"]  # list-valued fields stay out
    (tmp_path / "metrics.jsonl").unlink()  # a snapshot without it: the scalar columns remain
    assert runfiles.read_records(tmp_path) == (
        [{"step": 0, "acc": 0.1, "extra": None}, {"step": 5, "acc": 0.5, "extra": None}],
        "metrics.csv",
    )


# -- parallel runs ---------------------------------------------------------------------------------


def task(value: int, out: str, progress) -> None:
    """A worker task (module level: spawned workers import it by name)."""
    progress(0)
    if value < 0:
        raise runs.RunError(f"negative value {value}")
    if value == 13:
        raise KeyError("unlucky")
    progress(value)
    with open(out, "w") as f:
        f.write(str(value * 2))


def test_run_parallel_runs_every_task_and_names_each_failure(tmp_path):
    tasks = [(v, str(tmp_path / f"{i}.txt")) for i, v in enumerate([3, -1, 5, 13])]
    lines = []
    with pytest.raises(runs.RunError) as err:
        runs.run_parallel(
            task,
            tasks,
            [3, 1, 5, 13],
            jobs=2,
            names=["a", "b", "c", "d"],
            progress=False,
            echo=lines.append,
        )
    msg = str(err.value)
    assert "2 of 4 runs failed" in msg and "b: negative value -1" in msg
    assert "d: Traceback" in msg and "KeyError: 'unlucky'" in msg
    assert (tmp_path / "0.txt").read_text() == "6" and (tmp_path / "2.txt").read_text() == "10"
    assert sorted(lines) == ["b: failed", "d: failed"]
    runs.run_parallel(task, tasks[:1], [3], jobs=4, names=["a"], progress=False)

"""bin/train_mm.py --strategy=multi_worker with two worker processes on 127.0.0.1: a run
killed on one worker, restarted on both, resumes from the chief's checkpoint and
completes on both workers; only the chief writes into the work folder, and the other
worker's temporary folder is gone at the end.

Every process is bounded by `timeout -s KILL`: a worker whose peer died waits in its
collectives and ignores SIGTERM (tf-facts, "Distribution"). Each worker runs in its own
process group and is killed as a group: a SIGKILL to `timeout` alone leaves its python
child running, and that run would go on checkpointing into the work folder beside the
restarted one.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
KILL_AFTER_CHECKPOINT = 3


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start_workers(args, tmpdir, logs):
    """Starts worker 0 (the chief) and worker 1 on fresh local ports."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), TF_CPP_MIN_LOG_LEVEL="2",
                   TMPDIR=str(tmpdir))
        log = open(logs / f"worker{index}.log", "a")  # pylint: disable=consider-using-with
        procs.append(subprocess.Popen(
            ["timeout", "-s", "KILL", "600", sys.executable, "bin/train_mm.py", *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _kill(proc):
    """SIGKILLs a worker's process group (`timeout` and its python child) and reaps it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(name="started")
def _started():
    """The workers a test starts; any still running at its end are killed as groups."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            _kill(proc)


def _tail(path, lines=15):
    return "".join(path.read_text().splitlines(keepends=True)[-lines:])


def test_killed_worker_restarted_resumes_from_the_chiefs_checkpoint(tmp_path, small_demo_dir,
                                                                   started):
    workdir = tmp_path / "mm"
    logs = tmp_path / "logs"
    logs.mkdir()
    args = ["--flagfile=flags/demo_mm.flags", "--flagfile=flags/smoke.flags",
            f"--data_dir={small_demo_dir}", f"--workdir={workdir}", "--verbose=0",
            "--strategy=multi_worker", f"--steps={STEPS}", "--lr_boundaries=6",
            "--image_every=0", "--checkpoint_every=1"]

    # First run: wait for a few chief checkpoints, then SIGKILL worker 1, then the chief
    # (it would wait for its peer forever).
    first_tmp = tmp_path / "tmp1"
    first_tmp.mkdir()
    procs = _start_workers(args, first_tmp, logs)
    started.extend(procs)
    state = workdir / "checkpoints" / "checkpoint"
    # Under a loaded CI box two TF workers can take minutes to start: wait for the
    # checkpoint itself (within the workers' own 600 s bound), never a fixed guess, so a
    # slow start cannot turn into a kill before any checkpoint (a resume from step 0).
    deadline = time.time() + 560
    seen = False
    while not seen and time.time() < deadline and all(p.poll() is None for p in procs):
        seen = state.is_file() and f"ckpt-{KILL_AFTER_CHECKPOINT}" in state.read_text()
        if not seen:
            time.sleep(0.2)
    assert all(p.poll() is None for p in procs), (
        "a worker ended before it could be killed:\n" + _tail(logs / "worker0.log")
        + _tail(logs / "worker1.log"))
    assert seen, "no checkpoint 3 in 560 s:\n" + _tail(logs / "worker0.log")
    _kill(procs[1])
    _kill(procs[0])
    killed_state = state.read_text()
    time.sleep(3)  # a run that outlived its kill would write its next checkpoint by now
    assert state.read_text() == killed_state, "the killed run went on checkpointing"
    assert not (workdir / "summary.json").exists()
    # The non-chief worker checkpointed into its own temporary folder, never the workdir.
    assert list(first_tmp.iterdir()), "worker 1 wrote no temporary folder"

    # Restart both with the same command: they restore the chief's newest checkpoint.
    second_tmp = tmp_path / "tmp2"
    second_tmp.mkdir()
    procs = _start_workers(args, second_tmp, logs)
    started.extend(procs)
    codes = [p.wait(timeout=620) for p in procs]
    assert codes == [0, 0], _tail(logs / "worker0.log") + _tail(logs / "worker1.log")
    for index in range(2):
        assert f"M&M tuning done: {STEPS} steps" in (logs / f"worker{index}.log").read_text()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["resumed_from_step"] >= KILL_AFTER_CHECKPOINT
    assert summary["num_replicas"] == 2 and summary["strategy"] == "multi_worker"
    assert summary["graph_scope"] == "global"
    assert summary["graph_nodes"] == summary["global_batch_size"] * summary["patches_per_image"]
    assert (workdir / "backbone.weights.h5").is_file()
    assert f"ckpt-{STEPS}" in state.read_text()
    # The restarted worker 1 deleted its temporary folder.
    assert not list(second_tmp.iterdir())

"""The drivers' shared pool (largebatch/drivers.py Runner): several threads (one per workload) queue runs on one
pool; a free worker takes the run of the lowest priority first, each thread gets its own results back, and a
failing run reaches only the thread that queued it. Threads stand in for the spawned processes."""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from largebatch.drivers import Clock, Job, Runner

STARTED: list[str] = []
TAKEN: list[str] = []
RELEASE = threading.Event()


def fake_worker(overrides: list[str], run_dir: str, threads: int) -> dict:
    name = run_dir.rsplit("/", 1)[-1]
    STARTED.append(name)
    RELEASE.wait(10)
    if name == "bad":
        raise RuntimeError("this run broke")
    return {"summary": {"name": name, "threads": threads}}


class RecordingQueue(queue.PriorityQueue):
    """The runner's queue, recording the order its runs are taken in (``_get`` runs under the queue's lock:
    the order the workers then start in is a race, this one is not)."""

    def _get(self):
        item = super()._get()
        if item[3] is not None:
            TAKEN.append(item[3].run_dir.name)
        return item


class ThreadRunner(Runner):
    worker = staticmethod(fake_worker)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._queue = RecordingQueue()

    def make_pool(self):
        return ThreadPoolExecutor(self.jobs)


@pytest.fixture(autouse=True)
def _reset():
    STARTED.clear()
    TAKEN.clear()
    RELEASE.clear()
    yield
    RELEASE.set()


def jobs(tmp_path, names):
    return [Job(["scale=tiny"], tmp_path / name) for name in names]


def test_the_first_priority_takes_free_workers_first_and_each_thread_gets_its_own_results(tmp_path):
    results = {}
    with ThreadRunner(tmp_path, jobs=2, threads=1) as runner:
        def queue(priority, names):
            with runner.priority(priority):
                results[priority] = runner.run_many(jobs(tmp_path, names))

        late = threading.Thread(target=queue, args=(1, ["b1", "b2", "b3"]))
        early = threading.Thread(target=queue, args=(0, ["a1", "a2", "a3"]))
        late.start()
        deadline = time.monotonic() + 20
        while len(STARTED) < 2 and time.monotonic() < deadline:  # the later task took both idle workers
            time.sleep(0.01)
        early.start()
        while runner._queue.qsize() < 4 and time.monotonic() < deadline:  # b3, a1, a2, a3 wait
            time.sleep(0.01)
        RELEASE.set()
        late.join(20)
        early.join(20)
    assert TAKEN == ["b1", "b2", "a1", "a2", "a3", "b3"]  # priority 0 before the queued b3
    assert [r["name"] for r in results[0]] == ["a1", "a2", "a3"]
    assert [r["name"] for r in results[1]] == ["b1", "b2", "b3"]
    assert {s["run_dir"].rsplit("/", 1)[-1] for s in runner.steps} == {"a1", "a2", "a3", "b1", "b2", "b3"}


def test_runs_queued_within_the_settling_time_start_in_priority_order(tmp_path):
    """The later task queues first (it composed its configs sooner); the pool waits settle_s, then takes the
    earlier task's runs first: they hold both workers while the later task's wait."""
    runner = ThreadRunner(tmp_path, jobs=2, threads=1)
    runner.settle_s = 1.0
    b_jobs, a_jobs = ([runner.prepare(j) for j in jobs(tmp_path, names)] for names in (["b1", "b2"], ["a1", "a2"]))
    late = [runner._enqueue(j) for j in b_jobs]  # composed beforehand: queued within the settling time
    with runner.priority(-1):
        early = [runner._enqueue(j) for j in a_jobs]
    RELEASE.set()
    for future in late + early:
        future.result(20)
    runner.close()
    assert TAKEN == ["a1", "a2", "b1", "b2"]


def test_a_run_that_raises_fails_only_the_thread_that_queued_it(tmp_path):
    RELEASE.set()
    outcome = {}
    with ThreadRunner(tmp_path, jobs=2, threads=1) as runner:
        def queue(key, names):
            try:
                outcome[key] = runner.run_many(jobs(tmp_path, names))
            except RuntimeError as error:
                outcome[key] = error

        threads = [threading.Thread(target=queue, args=("broken", ["ok1", "bad"])),
                   threading.Thread(target=queue, args=("fine", ["ok2", "ok3"]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert isinstance(outcome["broken"], RuntimeError) and "broke" in str(outcome["broken"])
    assert [r["name"] for r in outcome["fine"]] == ["ok2", "ok3"]


def test_close_cancels_queued_runs(tmp_path):
    runner = ThreadRunner(tmp_path, jobs=2, threads=1)
    futures = [runner._enqueue(runner.prepare(job)) for job in jobs(tmp_path, ["r1", "r2", "r3", "r4"])]
    deadline = time.monotonic() + 20
    while len(STARTED) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    RELEASE.set()
    runner.close()
    assert [f.cancelled() for f in futures] == [False, False, True, True]
    assert sorted(STARTED) == ["r1", "r2"]  # r3 and r4 never started


def test_the_clock_saves_itself_while_the_driver_runs(tmp_path):
    clock = Clock(tmp_path / "driver_time.json", autosave_s=0.05)
    deadline = time.monotonic() + 10
    while not (tmp_path / "driver_time.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (tmp_path / "driver_time.json").exists()  # a killed driver keeps its time
    clock.stop()
    again = Clock(tmp_path / "driver_time.json")
    assert again.calls == 2 and again.earlier_s >= 0.0


def test_a_call_that_did_no_work_is_not_counted_and_the_tasks_that_shared_the_workers_add_up(tmp_path):
    path = tmp_path / "driver_time.json"
    first = Clock(path)
    first.shared_with.add("ptb")
    first.stop()
    seconds = json.loads(path.read_text())["seconds"]
    second = Clock(path)
    second.shared_with.add("resnet")
    second.stop()
    rerender = Clock(path)
    time.sleep(0.01)
    rerender.idle()
    assert rerender.calls == 2 and rerender.total_s() == pytest.approx(json.loads(path.read_text())["seconds"])
    rerender.stop()
    record = json.loads(path.read_text())
    assert record["calls"] == 2 and record["seconds"] >= seconds and record["shared_with"] == ["ptb", "resnet"]
    assert Clock(path).calls == 3


def metrics_lines(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def one_training_one_idle(tmp_path, then) -> dict:
    """Two real spawned workers: a long run training on one, the other idle after a short run; then
    ``then(runner)``. The outcome of each run_many ("long", "short": its result or its exception), and
    "closed": whether the Runner closed within two minutes (a pool that cannot end hangs the driver)."""
    run_dir, short_dir = tmp_path / "run", tmp_path / "short"
    outcome = {}

    def wait_for(key, runner, job):
        try:
            outcome[key] = runner.run_many([job])
        except Exception as error:  # noqa: BLE001 - the test reads which one
            outcome[key] = error

    def drive():
        with Runner(tmp_path, jobs=2, threads=1) as runner:
            threads = [threading.Thread(target=wait_for, args=(
                           "long", runner, Job(["scale=tiny", "epochs=500", "log_every=1"], run_dir))),
                       threading.Thread(target=wait_for, args=(
                           "short", runner, Job(["scale=tiny", "epochs=0.1"], short_dir)))]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and not (metrics_lines(run_dir) and "short" in outcome):  # in its loop
                time.sleep(0.1)
            outcome["both_spawned"] = "short" in outcome and len(runner._pool._processes) == 2
            then(runner)
            for thread in threads:
                thread.join(120)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    driver.join(300)
    outcome["closed"] = not driver.is_alive()
    return outcome


@pytest.mark.system
def test_a_signal_stops_the_running_runs_after_a_checkpoint_and_a_second_call_resumes_them(tmp_path):
    """Runner.stop (the drivers' SIGTERM handler): the real spawned worker checkpoints and stops, the thread
    waiting on it gets DriverStopped, and the run folder is left for the next call to resume. The other
    worker, idle after a short run, takes the same signal without dying: a dead worker breaks the pool, and
    the running run's thread would get BrokenProcessPool instead."""
    import signal

    from largebatch.drivers import DriverStopped, run_action

    outcome = one_training_one_idle(tmp_path, lambda runner: runner.stop(signal.SIGTERM))
    assert outcome["both_spawned"] and outcome["closed"]
    assert isinstance(outcome["long"], DriverStopped), outcome["long"]
    assert "again with the same arguments" in str(outcome["long"])
    assert outcome["long"].exit_code == 128 + signal.SIGTERM
    run_dir = tmp_path / "run"
    assert json.loads((tmp_path / "short" / "status.json").read_text())["status"] == "finished"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert run_action(run_dir) == "resume" and any((run_dir / "checkpoints").iterdir())


@pytest.mark.system
def test_a_worker_killed_from_outside_fails_the_runs_and_the_driver_still_ends(tmp_path):
    """The idle worker killed by the system (the OOM killer: SIGKILL) breaks the pool: the pool's SIGTERM
    stops the run on the other worker, which checkpoints and then waits on a queue the broken pool no
    longer feeds. The driver must still end (Runner.close kills it after a grace), and the run is left
    to resume."""
    import os
    import signal
    from concurrent.futures.process import BrokenProcessPool

    from largebatch.drivers import run_action

    def kill_the_idle_worker(runner):  # the one that ran the short run (its status.json names the process)
        os.kill(json.loads((tmp_path / "short" / "status.json").read_text())["pid"], signal.SIGKILL)

    outcome = one_training_one_idle(tmp_path, kill_the_idle_worker)
    assert outcome["both_spawned"] and outcome["closed"], "the driver hung on a broken pool"
    assert isinstance(outcome["long"], BrokenProcessPool), outcome["long"]
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert run_action(run_dir) == "resume"


def test_a_run_in_the_drivers_own_process_uses_the_runners_threads_and_gives_the_count_back(tmp_path, monkeypatch):
    """jobs=1 trains in the driver's process: it must still take ``threads`` (two drivers side by side, one
    thread each, would otherwise run 2 x cores threads and crawl), and leave the process's count as it was."""
    import torch

    from largebatch import drivers

    seen = []
    monkeypatch.setattr(drivers, "train", lambda cfg, run_dir: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    runner = Runner(tmp_path, jobs=1, threads=wanted)
    runner._run_here(Job(["scale=tiny"], tmp_path / "run"))
    assert seen == [wanted] and torch.get_num_threads() == before


def test_the_progress_line_counts_the_runs_left_and_estimates_from_the_mean_finished_run():
    from largebatch.drivers import Progress

    p = Progress(jobs=2)
    p.add(6)
    stopped = p.finished("runs/legw/batch=512,seed=2", 30.0, error="stopped by a signal")
    assert stopped.startswith("failed:") and "5 queued or running" in stopped
    assert "left at" not in stopped  # a stopped run's 30 s says nothing of the runs left
    first = p.finished("runs/sqrt/batch=512,seed=1", 120.0)
    assert "done: runs/sqrt/batch=512,seed=1 in 2.0 min; 2 run(s) ended" in first and "4 queued or running" in first
    assert "~4 min left at 2 at a time" in first  # 4 more runs of 2 min, 2 at a time
    second = p.finished("runs/legw/batch=512,seed=1", 240.0, error="NonFiniteError")
    assert second.startswith("failed:") and "~3 min left" in second  # the failure is left out: 3 x 2 min / 2
    p.add(0)
    for _ in range(3):
        last = p.finished("r", 60.0)
    assert "0 queued or running" in last and "left at" not in last


DRIVER = """
import os, sys, time
from pathlib import Path
from largebatch.drivers import Runner

def sleeper(seconds):
    time.sleep(seconds)

if __name__ == "__main__":
    pool = Runner(Path(sys.argv[1]), jobs=2).make_pool()
    futures = [pool.submit(sleeper, 300), pool.submit(sleeper, 0)]  # one busy worker, one idle
    futures[1].result()
    print(" ".join(str(pid) for pid in pool._processes), flush=True)
    time.sleep(300)
"""


@pytest.mark.system
def test_pool_workers_die_with_a_killed_driver(tmp_path):
    """kill -9 of a driver (the OOM killer's signal) leaves no orphan: each worker's watchdog sees its parent
    gone and stops itself, busy or idle."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in driver.stdout.readline().split()]
    assert len(workers) == 2
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 30

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)


def test_a_stopped_driver_exits_with_128_plus_the_signal_and_says_how_to_resume(tmp_path, capsys):
    import signal

    from largebatch.drivers import DriverStopped
    from largebatch.errors import fail

    runner = Runner(tmp_path)
    runner.stop(signal.SIGINT)
    with pytest.raises(SystemExit) as exited:
        fail(DriverStopped("by a signal (runs/x); call the driver again with the same arguments to resume",
                           runner.stop_signal))
    assert exited.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert err.startswith("stopped: by a signal") and "error:" not in err


def test_a_one_job_driver_stops_at_a_signal_outside_any_training_loop(tmp_path, monkeypatch):
    """JOBS=1: a SIGTERM while a run sets up (no trainer loop holds the signal) stops the driver there; the
    queued run never starts (it used to log "stopping" and train every run to the end)."""
    import os
    import signal

    from largebatch import drivers
    from largebatch.drivers import DriverStopped

    started = []

    def setting_up(cfg, run_dir):  # the signal arrives while the run builds its data
        started.append(run_dir.name)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        return {}

    monkeypatch.setattr(drivers, "train", setting_up)
    runner = Runner(tmp_path, jobs=1)
    with pytest.raises(DriverStopped) as stopped, runner.stop_on_signals():
        runner.run_many([Job(["scale=tiny"], tmp_path / "first"), Job(["scale=tiny"], tmp_path / "second")])
    assert started == ["first"] and stopped.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back

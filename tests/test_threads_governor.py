"""The thread governor gives way to other busy processes: it uses threads - round(cores other processes
kept busy) threads, re-measured every interval, and never fewer than one."""

from __future__ import annotations

import types
import warnings

import numba
import pytest

from edge_runtime.engine import threads as T


class FakeMachine:
    def __init__(self):
        self.now, self.busy, self.own = 0.0, 0.0, 0.0

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.now += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds


@pytest.fixture
def machine(monkeypatch):
    m = FakeMachine()
    monkeypatch.setattr(T, "_busy_seconds", lambda: m.busy)
    monkeypatch.setattr(T.os, "times", lambda: types.SimpleNamespace(user=m.own, system=0.0))
    m.set_calls = []
    monkeypatch.setattr(numba, "set_num_threads", m.set_calls.append)  # a 4-thread pool on any machine
    return m


def test_gives_way_to_a_busy_process_and_takes_the_cores_back(machine):
    g = T.ThreadGovernor(4, interval=0.5)
    g._clock = lambda: machine.now
    g._last = g._sample()
    machine.run(0.2, own_cores=4, other_cores=0)
    assert g.tick() == 4  # not yet an interval: no new measurement
    machine.run(0.4, own_cores=3.2, other_cores=0.8)  # one competing busy process
    assert g.tick() == 3
    machine.run(0.5, own_cores=1.0, other_cores=3.0)  # three of them
    assert g.tick() == 1
    machine.run(0.5, own_cores=1.0, other_cores=3.9)  # never below one thread
    assert g.tick() == 1
    machine.run(0.5, own_cores=1.0, other_cores=0.2)  # they are gone
    assert g.tick() == 4
    assert machine.set_calls == [3, 1, 4]  # numba is told only when the count changes


def test_no_proc_stat_keeps_the_count(machine, monkeypatch):
    monkeypatch.setattr(T, "_busy_seconds", lambda: None)
    g = T.ThreadGovernor(2, interval=0.0)
    machine.run(1.0, own_cores=1, other_cores=1)
    assert g.tick() == 2


def test_reads_this_machine():
    busy = T._busy_seconds()
    assert busy is None or busy > 0
    mine = T._busy_seconds_on(T._allowed_cpus())  # the CPUs this process may use: part of the machine's
    assert busy is None or 0 < mine <= busy + 1


def _cgroup(tmp_path, files: dict[str, str], proc: str):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "self-cgroup").write_text(proc)
    return tmp_path, tmp_path / "self-cgroup"


def test_cpu_quota_cgroup_v2(tmp_path):
    # a container of 1.5 CPUs inside a slice of 3: the smaller binds; "max" is no limit
    root, proc = _cgroup(
        tmp_path,
        {"sys/system.slice/cpu.max": "300000 100000\n", "sys/system.slice/box.service/cpu.max": "150000 100000\n"},
        "0::/system.slice/box.service\n",
    )
    assert T.cpu_quota(root / "sys", proc) == 1.5
    (root / "sys/system.slice/box.service/cpu.max").write_text("max 100000\n")
    assert T.cpu_quota(root / "sys", proc) == 3.0
    (root / "sys/system.slice/cpu.max").write_text("max 100000\n")
    assert T.cpu_quota(root / "sys", proc) is None


def test_cpu_quota_cgroup_v1(tmp_path):
    root, proc = _cgroup(
        tmp_path,
        {
            "sys/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
            "sys/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
        "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
    )
    assert T.cpu_quota(root / "sys", proc) == 0.5
    (root / "sys/cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert T.cpu_quota(root / "sys", proc) is None


def test_default_threads_honour_the_quota(monkeypatch):
    monkeypatch.setattr(T, "physical_cores", lambda: 4)
    for quota, want in ((None, 4), (1.5, 1), (0.3, 1), (2.0, 2), (8.0, 4)):
        monkeypatch.setattr(T, "cpu_quota", lambda q=quota: q)
        assert T.resolve_threads(None) == want
    assert T.resolve_threads(3) == 3  # a count the user asked for is theirs


# -- a thread count the caller chose: one warning when other processes leave fewer cores free ---------


@pytest.fixture
def pinned(machine, monkeypatch):
    """warn_if_busy on the fake machine, 2 CPUs, not yet checked in this process; `others` cores busy
    while it measures (this process idle)."""
    machine.others = 0.0
    clock = types.SimpleNamespace(
        monotonic=lambda: machine.now, sleep=lambda s: machine.run(s, own_cores=0.0, other_cores=machine.others)
    )
    monkeypatch.setattr(T, "time", clock)
    monkeypatch.setattr(T, "_allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(T, "_busy_seconds_on", lambda cpus: machine.busy if cpus == {0, 1} else None)
    monkeypatch.setattr(T, "_checked", False)
    return machine


def test_pinned_threads_warn_once_beside_a_busy_process(pinned):
    pinned.others = 1.0  # one competing busy process on 2 CPUs: 1 left
    with pytest.warns(T.ThreadsBusy, match=r"2 threads asked for, but other processes keep 1\.0 of the 2 CPUs"):
        T.warn_if_busy(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.warn_if_busy(2)  # once per process


@pytest.mark.parametrize(("threads", "others"), [(2, 0.3), (1, 2.0)])
def test_no_warning_when_the_cores_are_free_or_one_thread(pinned, threads, others):
    pinned.others = others
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.warn_if_busy(threads)


def test_sessions_check_only_a_count_the_caller_chose(pinned, hunyuan_f32_dir):
    from runtime_helpers import converted

    import edge_runtime

    pinned.others = 1.0
    model = edge_runtime.load(converted(hunyuan_f32_dir, "e4m3"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.session()  # the default count gives way by itself: not measured
    assert not T._checked
    with pytest.warns(T.ThreadsBusy):
        edge_runtime.load(model.path, threads=2).session()

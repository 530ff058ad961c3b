"""The test suite's own machinery: need() and BATCHMASK_REQUIRE_ALL, the shared-folder and browser
lookups, ports retried on a failed start, and the worker's test hooks (gates, not sleeps)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import _pytest.outcomes
import conftest
import pytest
from conftest import REPO, find_shared, need
from ports import StartFailed, free_ports, start_with_free_ports

from batchmask.batch import testhooks
from batchmask.batch.testhooks import NO_HOOKS, EnvHooks, hooks_from_env


def test_need_skips_or_fails_under_require_all(monkeypatch):
    need(True, "never raised")
    monkeypatch.setattr(conftest, "REQUIRE_ALL", False)
    with pytest.raises(pytest.skip.Exception, match="weed not found"):
        need(None, "weed not found")
    monkeypatch.setattr(conftest, "REQUIRE_ALL", True)
    with pytest.raises(BaseException) as raised:  # a skip here must fail this test, not skip it
        need("", "weed not found")
    assert raised.type is _pytest.outcomes.Failed and "BATCHMASK_REQUIRE_ALL" in str(raised.value)


def test_shared_folder_is_found_from_the_checkout_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("BATCHMASK_SHARED", raising=False)
    (tmp_path / "shared" / "weights").mkdir(parents=True)
    deep = tmp_path / "worktrees" / "wt1"
    deep.mkdir(parents=True)
    assert find_shared(deep) == tmp_path / "shared"  # two levels up
    monkeypatch.setenv("BATCHMASK_SHARED", str(tmp_path / "elsewhere"))
    assert find_shared(deep) == tmp_path / "elsewhere"


def test_render_report_names_the_browser_it_would_use(tmp_path):
    script = REPO / "scripts" / "render_report.sh"
    fake = tmp_path / "my-chrome"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    env = dict(os.environ, CHROMIUM=str(fake))
    res = subprocess.run(["bash", str(script), "--which"], capture_output=True, text=True, env=env)
    assert (res.returncode, res.stdout.strip()) == (0, str(fake))
    env = dict(os.environ, CHROMIUM=str(tmp_path / "none"), PATH="/nonexistent")
    res = subprocess.run(["/bin/bash", str(script), "--which"], capture_output=True, text=True, env=env)
    assert res.returncode == 1 and res.stdout == "" and "no chromium found" in res.stderr


def test_ports_are_distinct_and_a_failed_start_is_retried_with_new_ones():
    ports = free_ports(10)
    assert len(set(ports)) == 10 and all(p < 55000 for p in ports)
    seen = []

    def start(ps):
        seen.append(ps)
        if len(seen) < 3:
            raise StartFailed(f"address already in use: {ps[0]}")
        return "up"

    assert start_with_free_ports(start, 2) == "up" and len(seen) == 3
    with pytest.raises(RuntimeError, match=r"(?s)3 attempts.*address already in use"):
        start_with_free_ports(lambda ps: (_ for _ in ()).throw(StartFailed("address already in use")), 2)


def test_production_workers_get_the_no_op_hooks(monkeypatch):
    for h in testhooks.TEST_HOOKS:
        monkeypatch.delenv(h, raising=False)
    assert hooks_from_env() is NO_HOOKS
    monkeypatch.setenv(testhooks.GATE_ENV, "/x")
    assert isinstance(hooks_from_env(), EnvHooks)


def test_gate_holds_shards_after_the_free_ones_and_says_it_is_reached(tmp_path):
    gate = tmp_path / "gate"
    h = EnvHooks({testhooks.GATE_ENV: str(gate), testhooks.GATE_FREE_ENV: "1"})
    h.shard(0)  # free
    assert not os.path.exists(f"{gate}.reached")
    done = threading.Event()
    t = threading.Thread(target=lambda: (h.shard(1), done.set()))
    t.start()
    conftest.wait_until(lambda: os.path.exists(f"{gate}.reached"), "the gate reached")
    assert not done.is_set()  # held: the gate is closed
    gate.touch()
    t.join()
    assert done.is_set() and Path(f"{gate}.reached").read_text().split() == [str(os.getpid())]


def test_rendezvous_releases_nobody_until_everyone_is_there(tmp_path):
    d = tmp_path / "met"
    env = {testhooks.RENDEZVOUS_ENV: f"2:{d}"}
    first, second = EnvHooks(env), EnvHooks(env)
    done = threading.Event()
    t = threading.Thread(target=lambda: (first.shard(0), done.set()))
    t.start()
    conftest.wait_until(lambda: d.exists() and len(os.listdir(d)) == 1, "the first one arrived")
    assert not done.is_set()
    (d / "other-actor").write_text("")  # the second actor's arrival (one process here: one pid file)
    second.shard(0)
    t.join()
    assert done.is_set()


def test_the_late_starter_waits_for_another_actors_first_shard(tmp_path):
    marker = tmp_path / "late"
    env = {testhooks.START_AFTER_ENV: str(marker)}
    late, other = EnvHooks(env), EnvHooks(env)
    done = threading.Event()
    t = threading.Thread(target=lambda: (late.start(), done.set()))
    t.start()  # the first to start is the late one
    conftest.wait_until(marker.exists, "the late actor chose itself")
    other.start()  # returns at once: the marker is taken
    other.shard(0)
    assert not done.is_set()  # still held: the other has not finished a shard
    other.shard_done(0)
    t.join()
    assert done.is_set()


def test_gate_and_rendezvous_give_up_after_their_limit(tmp_path):
    h = EnvHooks({testhooks.GATE_ENV: str(tmp_path / "never"), testhooks.RENDEZVOUS_ENV: f"3:{tmp_path / 'm'}",
                  testhooks.GATE_LIMIT_ENV: "0.2"})
    h.shard(0)  # returns: a hung worker would hang the test instead of failing it

"""The pipeline's moving parts: module groups, the prefetching loader, streaming emission."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import robustmerge_kernels as rk
from robustmerge_kernels.pipeline import Prefetcher


def test_prefetcher_keeps_order_and_overlaps_loading():
    started = {i: threading.Event() for i in range(5)}
    names = []

    def load(i):
        names.append(threading.current_thread().name)
        started[i].set()
        return i * 10

    seen = []
    for item, value in Prefetcher(load, list(range(5))):
        seen.append((item, value))
        if item + 1 in started:  # the next item loads while this one is in use
            assert started[item + 1].wait(timeout=10)
    assert seen == [(i, i * 10) for i in range(5)]
    assert all(name.startswith("robustmerge-prefetch") for name in names)


def test_prefetcher_reraises_the_loaders_error_in_order():
    def load(i):
        if i == 2:
            raise ValueError("bad group 2")
        return i

    got = []
    with pytest.raises(ValueError, match="bad group 2"):
        for item, _ in Prefetcher(load, [0, 1, 2, 3]):
            got.append(item)
    assert got == [0, 1]


def test_prefetcher_stops_its_thread_when_the_consumer_fails():
    """An error while merging group i must not leave a read of group i + 1 running after
    merge() closes the sources (a closed descriptor could be reused by another file)."""
    running = threading.Event()
    finished = threading.Event()

    def load(i):
        if i == 1:
            running.set()
            time.sleep(0.2)
            finished.set()
        return i

    gen = iter(Prefetcher(load, [0, 1, 2]))
    next(gen)
    assert running.wait(timeout=10)  # group 1 is being read in the background
    gen.close()  # what `with closing(...)` does when the loop body raises
    assert finished.is_set()  # close() waited for the in-flight read
    assert not any(t.name.startswith("robustmerge-prefetch") for t in threading.enumerate())


def test_disabled_prefetcher_loads_in_the_callers_thread():
    names = []
    list(Prefetcher(lambda i: names.append(threading.current_thread().name), [0, 1], enabled=False))
    assert names == [threading.current_thread().name] * 2


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_many_small_groups_from_files_equal_one_group_in_memory(adapter_dirs, trained_models, backend):
    """Folders merged one module per group (every group prefetched) give exactly what the
    same adapters give in memory in one group."""
    from peft import get_peft_model_state_dict

    pairs = [(get_peft_model_state_dict(m), m.peft_config["default"]) for m in trained_models]
    whole = rk.merge(pairs, backend=backend)
    split = rk.merge(adapter_dirs, backend=backend, group_bytes=1)
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key

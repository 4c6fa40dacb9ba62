"""Leaving without the interpreter's teardown (about 0.5 s after torch or numba): only when nothing is lost."""

import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from helpers import cli_env

PROBE = textwrap.dedent("""
    import sys, threading
    import h5py
    from acseg_cli.process import teardown_can_be_skipped as ok
    seen = [ok()]                          # False: torch and numba not imported, nothing slow to skip
    __import__(sys.argv[3])                # torch, or numba (refine's compiled loops, without torch)
    seen.append(ok())                      # True
    w = h5py.File(sys.argv[1], "w")
    seen.append(ok())                      # False: a file open for writing
    w.close()
    r = h5py.File(sys.argv[2], "r")
    seen.append(ok())                      # True: reading only
    r.close()
    ev = threading.Event()
    t = threading.Thread(target=ev.wait)
    t.start()
    seen.append(ok())                      # False: a thread still running
    ev.set(); t.join()
    d = threading.Thread(target=threading.Event().wait, daemon=True)
    d.start()
    seen.append(ok())                      # True: daemon threads do not hold the exit
    print(seen)
""")


@pytest.mark.slow
@pytest.mark.parametrize("module", ["torch", "numba"])
def test_teardown_is_skipped_only_when_nothing_is_open(tmp_path, module):
    with h5py.File(tmp_path / "r.h5", "w") as f:
        f["x"] = np.arange(3)
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "w.h5"), str(tmp_path / "r.h5"), module],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[False, True, False, True, False, True]"


@pytest.mark.slow
def test_a_real_process_still_prints_exits_and_writes_whole(tmp_path):
    """Through the console entry point: the path on stdout, the exit code, a complete store; an error still
    exits 1 with its one line."""
    from planted import planted_images, write_planted_store

    toks, labels, _ = planted_images(n_images=6)
    feats = write_planted_store(tmp_path / "f.h5", toks, labels)
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "acseg_cli", *map(str, a)],
        capture_output=True,  # noqa: E731
        text=True,
        env=cli_env(),
    )
    r = run("conceptualize", feats, "--method", "kmeans", "-o", tmp_path / "c.h5", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5") as f:
        assert f.attrs["complete"] and f.attrs["n_images"] == 6
    r = run("conceptualize", tmp_path / "missing.h5", "-q")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("Error: ")


HEAP_PROBE = textwrap.dedent("""
    import random, resource, sys
    import torch
    if sys.argv[1] == "keep":
        from acseg_cli.process import keep_heap
        keep_heap()
    random.seed(0)
    def step():  # buffers of 40-70 MB, as a training step allocates and frees them
        n = random.randint(40, 70) << 18
        a = torch.ones(n)
        b = a[: n // 2] + 1
        del a, b
    for _ in range(10):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_heap_serves_freed_buffers_again_without_page_faults():
    """fit-acg's process setting: after a few steps, buffers come from memory already faulted in; by default
    glibc maps each buffer above 32 MB afresh and the kernel faults in every page again (about 200,000 faults
    in these 10 steps; 5,000 with it). torch's buffers: numpy asks for huge pages, which fault 512 times less.
    Page faults depend on the machine's state as well (the probe failed 2 of 18 full quick runs, never alone):
    up to three pairs of probes, and the test fails only when none shows the setting's effect."""
    seen = []
    for _ in range(3):
        faults = {}
        for mode in ("default", "keep"):
            r = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, env=cli_env())
            assert r.returncode == 0, r.stderr
            faults[mode] = int(r.stdout)
        seen.append(faults)
        # (default: not so with transparent huge pages always on)
        if faults["default"] > 100_000 and faults["keep"] < faults["default"] / 20:
            return
    pytest.fail(f"freed buffers were faulted in again under keep_heap in every probe: {seen}")

"""Beyond one process: extract --shard, merge, shard-wise later stages, fit-acg under torchrun (gloo)."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from helpers import TEST_BACKBONE, cli, cli_env, make_images

from stages.errors import UsageError
from stages.shards import parse_shard, shard_range

SMALL = [*TEST_BACKBONE, "--batch-size", "2"]


def _datasets(path):
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[:]) if isinstance(v, h5py.Dataset) else None)
        attrs = {
            k: f.attrs.get(k) for k in ("content_sha256", "skipped", "n_skipped", "n_images", "params", "backbone")
        }
    return out, attrs


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """11 photos of two grid sizes plus one unreadable file; one unsharded store and a 3-way split."""
    d = tmp_path_factory.mktemp("shards")
    make_images(d / "imgs", n=11)
    (d / "imgs" / "broken.jpg").write_bytes(b"not an image")
    full = d / "full.h5"
    assert cli(["extract", d / "imgs", "-o", full, *SMALL]).exit_code == 0
    shards = []
    for i in range(3):
        p = d / f"s{i}.h5"
        r = cli(["extract", d / "imgs", "--shard", f"{i}/3", "-o", p, *SMALL])
        assert r.exit_code == 0, r.output
        shards.append(p)
    return d, full, shards


def test_shard_ranges_tile_the_batches():
    for n_batches in (1, 5, 16, 17):
        for count in range(1, n_batches + 1):
            ranges = [shard_range(n_batches, i, count) for i in range(count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n_batches
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert parse_shard("3/16") == (3, 16)
    for bad in ("16/16", "-1/4", "a/b", "1", "0/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def test_merged_shards_equal_an_unsharded_run_bit_for_bit(split, tmp_path):
    d, full, shards = split
    sizes = [h5py.File(p).attrs["n_images"] for p in shards]
    assert sum(sizes) == 11 and all(s >= 3 for s in sizes)  # every shard did real work
    merged = tmp_path / "merged.h5"
    r = cli(["merge", shards[2], shards[0], shards[1], "-o", merged, "-q"])  # any order
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(merged)
    a, aa = _datasets(full)
    b, ba = _datasets(merged)
    assert set(a) == set(b)  # no shard plan left in the merged store
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert aa == ba  # same content hash, same skipped list (the broken file once), same params
    assert json.loads(ba["skipped"])[0]["name"] == "broken.jpg" and ba["n_skipped"] == 1
    # and the later stages take it as a normal store
    assert cli(["conceptualize", merged, "--method", "kmeans", "-q"]).exit_code == 0


def test_missing_overlapping_and_foreign_shards_are_refused_by_name(split, tmp_path):
    d, full, shards = split
    out = tmp_path / "m.h5"
    with h5py.File(shards[2]) as f:
        lost = sorted(n.decode() for n in f["names"][:])
    r = cli(["merge", shards[0], shards[1], "-o", out])
    assert r.exit_code == 1 and "2/3 missing" in r.output
    assert all(name in r.output for name in lost[:3]), r.output
    r = cli(["merge", shards[0], shards[1], shards[1], shards[2], "-o", out])
    assert r.exit_code == 1 and "given twice" in r.output
    with h5py.File(shards[1]) as f:
        assert f["names"][0].decode() in r.output
    r = cli(["merge", shards[0], full, "-o", out])
    assert r.exit_code == 1 and "not a shard" in r.output
    other = tmp_path / "other.h5"
    assert cli(["extract", d / "imgs", "--shard", "0/2", "-o", other, *SMALL]).exit_code == 0
    r = cli(["merge", other, shards[1], shards[2], "-o", out])
    assert r.exit_code == 1 and "one split" in r.output
    assert not out.exists() and not list(tmp_path.glob(".m.h5*"))
    r = cli(["merge", shards[0], shards[1], shards[2], "-o", shards[0], "--overwrite"])
    assert r.exit_code == 2 and "is the input" in r.output
    r = cli(["extract", d / "imgs", "--shard", "3/3", "-o", tmp_path / "x.h5", *SMALL])
    assert r.exit_code == 2 and "0..N-1" in r.output
    r = cli(["extract", d / "imgs", "--shard", "7/9", "-o", tmp_path / "x.h5", *SMALL, "--batch-size", "8"])
    assert r.exit_code == 2 and "is empty" in r.output


def test_later_stages_run_shard_by_shard(split, tmp_path):
    """conceptualize each shard with one ACG, then merge the concepts or classify the parts together:
    both equal the unsharded pipeline."""
    d, full, shards = split
    acg = tmp_path / "acg.pt"
    assert cli(["fit-acg", full, "-o", acg, "--steps", "3", "--batch-size", "4", "-q"]).exit_code == 0
    parts = []
    for i, s in enumerate(shards):
        p = tmp_path / f"c{i}.h5"
        assert cli(["conceptualize", s, "--acg", acg, "-o", p, "-q"]).exit_code == 0
        parts.append(p)
    whole = tmp_path / "whole.h5"
    assert cli(["conceptualize", full, "--acg", acg, "-o", whole, "-q"]).exit_code == 0
    merged = tmp_path / "cm.h5"
    r = cli(["merge", *parts, "-o", merged, "-q"])
    assert r.exit_code == 0, r.output
    a, _ = _datasets(whole)
    b, _ = _datasets(merged)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    r = cli(["merge", parts[0], parts[1], "-o", tmp_path / "bad.h5"])
    assert r.exit_code == 1 and "missing" in r.output
    # classify: the parts on stdin (one path per line) == the merged store == the unsharded store
    outs = []
    for name, args, stdin in (
        ("parts", [], "\n".join(map(str, parts[::-1])) + "\n"),
        ("merged", [merged], None),
        ("whole", [whole], None),
    ):
        o = tmp_path / name
        r = cli(["classify", *args, "-K", "3", "-o", o, "-q"], input=stdin)
        assert r.exit_code == 0, r.output
        outs.append(o)
    pngs = sorted(p.name for p in outs[2].glob("*.png"))
    assert len(pngs) == 11
    for o in outs[:2]:
        assert sorted(p.name for p in o.glob("*.png")) == pngs
        for n in pngs:
            assert (o / n).read_bytes() == (outs[2] / n).read_bytes()
    # apply mode shard by shard with the centroids fitted on all of them
    o = tmp_path / "applied"
    r = cli(["classify", parts[1], "--centroids", outs[2] / "classes.h5", "-o", o, "-q"])
    assert r.exit_code == 0, r.output
    for p in o.glob("*.png"):
        assert p.read_bytes() == (outs[2] / p.name).read_bytes()
    r = cli(["classify", parts[0], parts[0], "-K", "3", "-o", tmp_path / "dup", "-q"])
    assert r.exit_code == 1 and "more than one" in r.output


def _fit(args, cwd, nproc):
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "acseg_cli", "fit-acg", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_fit_acg_under_torchrun_with_two_gloo_processes(split, tmp_path):
    """Two processes, each reading its half of every global batch, follow the one-process loss curve."""
    d, full, _ = split
    common = [
        full,
        "--steps",
        "30",
        "--batch-size",
        "8",
        "--max-tokens",
        "20",
        "--lr",
        "1e-3",
        "--warmup",
        "5",
        "--checkpoint-every",
        "10",
        "--device",
        "cpu",
    ]
    (tmp_path / "one").mkdir()
    one = _fit([*common, "-o", tmp_path / "one" / "acg.pt"], tmp_path, 1)
    assert one.returncode == 0, one.stderr
    (tmp_path / "two").mkdir()
    two = _fit([*common, "-o", tmp_path / "two" / "acg.pt"], tmp_path, 2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.strip() == str(tmp_path / "two" / "acg.pt")  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["acg.log.jsonl", "acg.loss.png", "acg.pt"]
    h1 = [json.loads(x) for x in (tmp_path / "one" / "acg.log.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (tmp_path / "two" / "acg.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in h1] == [r["step"] for r in h2]
    assert h2[-1]["loss"] < h2[0]["loss"] - 0.01  # learning
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(h1, h2)) < 1e-4  # same curve within float noise
    from stages.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "two" / "acg.pt")
    assert ck.train["processes"] == 2
    r = cli(["conceptualize", full, "--acg", tmp_path / "two" / "acg.pt", "-o", tmp_path / "c.h5", "-q"])
    assert r.exit_code == 0, r.output


def _kill_all_with(marker: str) -> None:
    """SIGKILL every process whose command line mentions ``marker``."""
    import os
    import signal

    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.slow
def test_a_killed_torchrun_fit_resumes_to_the_same_weights(split, tmp_path):
    import time

    import torch

    d, full, _ = split
    common = [
        full,
        "--steps",
        "60",
        "--batch-size",
        "8",
        "--max-tokens",
        "20",
        "--lr",
        "1e-3",
        "--warmup",
        "5",
        "--checkpoint-every",
        "10",
        "-q",
        "--device",
        "cpu",
    ]
    ref = _fit([*common, "-o", tmp_path / "ref.pt"], tmp_path, 2)
    assert ref.returncode == 0, ref.stderr
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "acseg_cli",
        "fit-acg",
        *map(str, common),
        "-o",
        str(tmp_path / "k.pt"),
    ]
    p = subprocess.Popen(launcher, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".k.pt.resume"
    t0 = time.monotonic()
    while not state.exists() and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.02)
    _kill_all_with(str(tmp_path / "k.pt"))  # the launcher and both ranks (torchrun starts them in their own sessions)
    p.wait()
    if not state.exists():
        pytest.skip("the run ended before a resume state could be killed")
    assert not (tmp_path / "k.pt").exists()
    r = _fit([*common, "-o", tmp_path / "k.pt", "--resume"], tmp_path, 2)
    assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "ref.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "k.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_under_torchrun_a_usage_error_is_said_once_and_others_name_their_rank(tmp_path, monkeypatch):
    from helpers import cli

    monkeypatch.setenv("WORLD_SIZE", "4")
    for rank in ("0", "3"):
        monkeypatch.setenv("RANK", rank)
        r = cli(["conceptualize", tmp_path / "none.h5", "--method", "bogus"])
        assert r.exit_code == 2
        assert (r.stderr == "") == (rank != "0")  # the same on every rank: rank 0 alone says it
        r = cli(["fit-acg", tmp_path / "none.h5", "-o", tmp_path / "a.pt"])
        assert r.exit_code == 1 and r.stderr.startswith(f"Error: (rank {rank} of 4) ")
        assert len(r.stderr.strip().splitlines()) == 1


def test_torchrun_with_more_processes_than_gpus_says_what_to_do(monkeypatch):
    """Seen on a one-GPU machine: rank 1 asked for cuda:1 and died with 'invalid device ordinal'."""
    import torch

    from stages.distributed import setup_distributed

    for k, v in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError) as e:
        setup_distributed("cuda")
    assert "2 processes" in str(e.value) and "1 GPU" in str(e.value)
    assert "--nproc-per-node 1" in e.value.todo and "--device cpu" in e.value.todo

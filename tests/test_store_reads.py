"""Reading a store's rows straight from the file's pages (MappedRows): the same values as h5py gives, and h5py
wherever the layout is not the one acseg writes."""

import h5py
import numpy as np
import pytest
import torch
from planted import planted_images, write_planted_store

from stages.features import FeatureStore, MappedRows


def _ranges(n, rng, count=40):
    out = [(0, n), (0, 1), (n - 1, n), (6, 8), (7, 15)]  # chunk edges of 7-row chunks, and whole
    for _ in range(count):
        a = int(rng.integers(0, n))
        out.append((a, int(rng.integers(a + 1, n + 1))))
    return out


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("chunks", [(7, 5), None])
def test_mapped_rows_equal_h5py_rows(tmp_path, dtype, chunks):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(100, 5)).astype(dtype)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("other", data=np.arange(10.0))  # something before the rows in the file
        if chunks:  # grown in appends, as acseg's writer does, so the chunks need not lie in order
            ds = f.create_dataset("x", shape=(0, 5), maxshape=(None, 5), dtype=dtype, chunks=chunks)
            f.create_dataset("y", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(3,))
            for s in range(0, 100, 13):
                e = min(100, s + 13)
                ds.resize(e, axis=0)
                ds[s:e] = data[s:e]
                f["y"].resize(e, axis=0)
                f["y"][s:e] = 1.0
        else:
            f.create_dataset("x", data=data)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        m = MappedRows.of(f, f["x"])
        assert m is not None
        for a, b in _ranges(100, rng):
            got = m.read(a, b)
            assert got.dtype == dtype and np.array_equal(got, data[a:b]), (a, b)
            pieces = list(m.pieces(a, b))
            assert np.array_equal(np.concatenate([p for _, p in pieces]), data[a:b])
            assert [o for o, _ in pieces] == list(np.cumsum([0] + [len(p) for _, p in pieces[:-1]]))


def test_layouts_acseg_does_not_write_are_read_by_h5py(tmp_path):
    data = np.ones((50, 4), np.float16)
    with h5py.File(tmp_path / "b.h5", "w") as f:
        f.create_dataset("gzip", data=data, chunks=(10, 4), compression="gzip")
        f.create_dataset("shuffle", data=data, chunks=(10, 4), shuffle=True)
        f.create_dataset("big_endian", data=data.astype(">f2"))
        f.create_dataset("ints", data=np.ones((50, 4), np.int32))
        f.create_dataset("split_columns", data=data, chunks=(10, 2))
        f.create_dataset("unwritten", shape=(50, 4), dtype=np.float16, chunks=(10, 4))
        f.create_dataset("empty", shape=(0, 4), maxshape=(None, 4), dtype=np.float16, chunks=(10, 4))
    with h5py.File(tmp_path / "b.h5", "r") as f:
        for name in f:
            assert MappedRows.of(f, f[name]) is None, name


def test_a_chunk_past_the_end_of_the_file_is_not_mapped(tmp_path, monkeypatch):
    """h5py refuses a truncated file at open; a chunk index that points past the end (a crafted file) must
    leave the reading to h5py too, not map beyond the file."""
    import os

    p = tmp_path / "c.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=np.ones((4000, 8), np.float32), chunks=(500, 8))
    with h5py.File(p, "r") as f:
        assert MappedRows.of(f, f["x"]) is not None
        end = max(f["x"].id.get_chunk_info(i).byte_offset for i in range(8)) + 500 * 8 * 4
        real = os.path.getsize
        monkeypatch.setattr(os.path, "getsize", lambda q: min(real(q), end - 1))
        assert MappedRows.of(f, f["x"]) is None


def test_a_store_reads_the_same_mapped_and_through_h5py(tmp_path):
    """A planted store at 512 dims: 1,024 rows per chunk, so batches cross chunk edges."""
    toks, labels, _ = planted_images(n_images=40, dim=512)
    path = write_planted_store(tmp_path / "f.h5", toks, labels)
    with FeatureStore(path) as st, h5py.File(path, "r") as f:
        assert st._f["tokens"].chunks[0] == 1024 and st._map("tokens") is not None
        assert st._map("cls_attn") is not None
        ref = f["tokens"][:].astype(np.float32)
        o = st.offsets
        for i in (0, 15, 16, 39):
            assert np.array_equal(st.tokens(i), ref[o[i] : o[i + 1]])
            assert np.array_equal(st.cls_attn(i), f["cls_attn"][o[i] : o[i + 1]])
        reuse = {}
        for s, e in ((0, 17), (17, 40), (5, 6)):
            x, mask, _ = st.read_batch(s, e, reuse=reuse)
            assert mask.all() and np.array_equal(x.reshape(-1, 512).numpy(), ref[o[s] : o[e]])
            y, _, _ = st.read_batch(s, e)
            assert torch.equal(x, y)
            for keep in ({}, None):  # as stored (float16, for a GPU): the same values, half the bytes
                z, _, _ = st.read_batch(s, e, reuse=keep, as_stored=True)
                assert z.dtype == torch.float16 and torch.equal(z.float(), y)
        assert all(np.array_equal(a, ref[o[i] : o[i + 1]]) for a, i in zip(st.read_many([33, 2, 17]), [33, 2, 17]))
        assert np.array_equal(np.concatenate(st.read_range(3, 30)), ref[o[3] : o[30]])
        rows = st.stored_rows(3, 30)  # as stored: float16, unpadded, the images' rows one after another
        assert rows.dtype == np.float16 and np.array_equal(rows.astype(np.float32), ref[o[3] : o[30]])
        assert st.stored_rows(3, 30, dtype=np.float32).dtype == np.float32


@pytest.mark.parametrize("size", [0, 1, 64, 65, 200])
def test_file_sha256_is_the_files_sha256(tmp_path, size):
    import hashlib

    from stages.digests import file_sha256

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", bufsize=64) == hashlib.sha256(data).hexdigest()


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's maps of ``path`` (/proc/self/smaps)."""
    total, ours = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and not line.startswith(("Rss", "Size")):
            ours = line.rstrip().endswith(str(path))
        elif ours and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs Linux /proc")
@pytest.mark.parametrize("release_mb, bounded", [(1, True), (1 << 20, False)])
def test_pages_read_through_the_map_do_not_pile_up(tmp_path, monkeypatch, release_mb, bounded):
    """Reading a whole store batch by batch leaves at most about RELEASE_BYTES of it resident in the process
    (it used to leave all of it: 1.4 GB more for 2,400 CamVid images), and the rows read are the same before
    and after a release, also through a view taken before it. Without releases (the control) the whole
    tokens dataset stays resident, so the bound is what the release does."""
    toks, labels, _ = planted_images(n_images=64, dim=512)  # 64 x 64 tokens x 512 float16: 4 MB
    path = write_planted_store(tmp_path / "f.h5", toks, labels)
    monkeypatch.setattr(MappedRows, "RELEASE_BYTES", release_mb << 20)
    with FeatureStore(path) as st, h5py.File(path, "r") as f:
        ref = f["tokens"][:].astype(np.float32)
        o = st.offsets
        m = st._map("tokens")
        view = m.read(0, 10)  # one chunk: a view of the map
        reuse = {}
        for s in range(0, 64, 8):
            x, _, _ = st.read_batch(s, s + 8, reuse=reuse)
            assert np.array_equal(x.reshape(-1, 512).numpy(), ref[o[s] : o[s + 8]])
        rss = _mapped_rss_kb(path)
        size = ref.size * 2 // 1024
        assert (rss <= 1024 + 512) if bounded else (rss >= size), (rss, size)
        m.release()
        assert np.array_equal(view.astype(np.float32), ref[:10])  # mapped again, the same bytes


def test_rows_read_through_h5py_as_stored(tmp_path):
    """A store in a layout acseg does not write (gzip) is read through h5py, as float32 or as stored."""
    toks, labels, _ = planted_images(n_images=6)
    path = write_planted_store(tmp_path / "f.h5", toks, labels)
    with h5py.File(path, "r+") as f:
        data = f["tokens"][:]
        del f["tokens"]
        f.create_dataset("tokens", data=data, chunks=(64, data.shape[1]), compression="gzip")
    with FeatureStore(path) as st:
        assert st._map("tokens") is None
        for keep in ({}, None):
            x, _, _ = st.read_batch(0, 6, reuse=keep)
            z, _, _ = st.read_batch(0, 6, reuse=keep, as_stored=True)
            assert x.dtype == torch.float32 and z.dtype == torch.float16
            assert np.array_equal(x.reshape(-1, data.shape[1]).numpy(), data.astype(np.float32))
            assert torch.equal(z.float(), x)

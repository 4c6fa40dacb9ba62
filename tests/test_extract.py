"""extract and the feature store: schema, provenance, resume, bad inputs, the pipe protocol."""

import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from helpers import TEST_BACKBONE, cli, cli_env, make_images
from PIL import Image

from stages.errors import AcsegError
from stages.extract import plan_batches
from stages.features import FeatureStore
from stages.images import discover, load_rgb, target_grid


def run_extract(images, out, *extra):
    return cli(["extract", images, "-o", out, *TEST_BACKBONE, *extra])


def test_extract_writes_a_valid_store_and_prints_only_its_path(images, tmp_path):
    out = tmp_path / "f.h5"
    r = run_extract(images, out)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"{out}\n"
    with FeatureStore(out) as st:
        assert st.n_images == 6
        assert st.dim == 64
        assert set(st.names) == {f"img_{i:02d}.png" for i in range(6)}
        for i in range(st.n_images):
            h, w = st.grid[i]
            assert st.tokens(i).shape == (h * w, 64)
            assert st.grid_tokens(i).shape == (h, w, 64)
            attn = st.cls_attn(i)
            assert attn.shape == (h * w,) and np.all(attn >= 0) and attn.sum() <= 1 + 1e-5
            H, W = st.image_size[i]
            assert (H, W) in {(80, 96), (96, 80)}
            assert (h, w) == target_grid(H, W, 64, 16)
        assert st.attr("kind") == "features" and st.attr("complete")
        bb = st.attr_json("backbone")
        assert bb["preset"] == "test-vit" and len(bb["weights_sha256"]) == 64
        assert st.attr_json("params")["short_side"] == 64
        assert st.attr("created") and st.attr("uid")
    assert not list(tmp_path.glob(".*partial"))


def test_json_output_and_refusal_to_overwrite(images, tmp_path):
    out = tmp_path / "f.h5"
    r = run_extract(images, out, "--json")
    obj = json.loads(r.stdout)
    assert obj["path"] == str(out) and obj["n_images"] == 6 and obj["kind"] == "features"
    before = out.read_bytes()
    r = run_extract(images, out)
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: ") and "--overwrite" in r.stderr and r.stdout == ""
    assert out.read_bytes() == before
    assert run_extract(images, out, "--overwrite").exit_code == 0


def test_tokens_match_a_direct_forward(images, tmp_path):
    """The stored fp16 tokens are the backbone's output for the resized, normalised image."""
    import torch

    from stages.backbones import create_backbone
    from stages.images import resize_normalise

    out = tmp_path / "f.h5"
    run_extract(images, out, "--feature", "tokens", "--device", "cpu")  # the forward's arithmetic (CUDA: bf16 autocast)
    bb = create_backbone("test-vit", random_weights=True)
    with FeatureStore(out) as st:
        i = 0
        img = load_rgb(str(images / st.names[i]))
        x = torch.from_numpy(resize_normalise(img, tuple(st.grid[i]), 16, bb.preset.mean, bb.preset.std))[None]
        with torch.inference_mode():
            f, a, _ = bb(x, feature="tokens")
        np.testing.assert_allclose(st.tokens(i), f[0].numpy(), atol=2e-2, rtol=2e-3)
        np.testing.assert_allclose(st.cls_attn(i), a[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("layer", [-1, 0])
def test_keys_are_the_blocks_attention_keys(layer, images, tmp_path):
    """--feature keys stores the chosen block's attention keys (heads side by side, prefix tokens dropped),
    read here from timm's own qkv projection with a hook on an untouched forward of the whole model."""
    import torch

    from stages.backbones import create_backbone
    from stages.images import resize_normalise

    out = tmp_path / "k.h5"
    r = run_extract(images, out, "--feature", "keys", "--layer", str(layer), "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    bb = create_backbone("test-vit", random_weights=True)
    vit = bb.vit
    blk = vit.blocks[layer]
    seen = {}
    hook = blk.attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o))
    with FeatureStore(out) as st:
        assert st.feature_kind == "keys"
        img = load_rgb(str(images / st.names[0]))
        x = torch.from_numpy(resize_normalise(img, tuple(st.grid[0]), 16, bb.preset.mean, bb.preset.std))[None]
        with torch.inference_mode():
            vit.forward_features(x)
        hook.remove()
        d = seen["qkv"].shape[-1] // 3
        keys = seen["qkv"][0, vit.num_prefix_tokens :, d : 2 * d]  # (tokens, heads * head_dim), heads in order
        np.testing.assert_allclose(st.tokens(0), keys.numpy(), atol=2e-2, rtol=2e-3)
        with torch.inference_mode():
            _, a, _ = bb(x, feature="tokens")  # the forward through every block
        np.testing.assert_allclose(st.cls_attn(0), a[0].numpy(), atol=1e-6)  # the CLS attention is unchanged


def test_keys_and_layer_options(images, tmp_path):
    r = run_extract(images, tmp_path / "k.h5", "--feature", "keys", "--layer", "0")
    assert r.exit_code == 0, r.stderr
    with FeatureStore(tmp_path / "k.h5") as st:
        assert st.feature_kind == "keys" and st.params["layer"] == 0
    r = run_extract(images, tmp_path / "bad.h5", "--layer", "40")
    assert r.exit_code == 2 and "--layer" in r.stderr


def test_bad_images_are_skipped_and_reported(tmp_path):
    d = tmp_path / "imgs"
    make_images(d, n=3)
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    good = (d / "img_00.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 3])
    out = tmp_path / "f.h5"
    r = run_extract(d, out)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"{out}\n"
    with FeatureStore(out) as st:
        assert st.n_images == 3
        skipped = json.loads(st.attr("skipped"))
        assert {s["name"] for s in skipped} == {"empty.jpg", "text.png", "truncated.png"}
        assert st.attr("n_skipped") == 3
    r = run_extract(d, tmp_path / "strict.h5", "--strict")
    assert r.exit_code == 1 and "cannot read image" in r.stderr
    assert not (tmp_path / "strict.h5").exists()


def test_real_world_decoding(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.random((40, 60)) * 65535).astype(np.uint16)).save(d / "gray16.png")
    Image.fromarray(rgb).convert("P").save(d / "pal.png", transparency=0)
    Image.fromarray(rgb).convert("RGBA").save(d / "rgba.png")
    Image.fromarray(rgb).convert("L").save(d / "gray.png")
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90: stored 60 wide, shown 40 wide
    Image.fromarray(rgb).save(d / "rot.jpg", exif=ex)
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    for p in sorted(d.iterdir()):
        img = load_rgb(str(p))
        assert img.mode == "RGB"
        assert img.size == ((40, 60) if p.name == "rot.jpg" else (60, 40)), p.name
    r = run_extract(d, tmp_path / "f.h5")
    assert r.exit_code == 0, r.stderr
    with FeatureStore(tmp_path / "f.h5") as st:
        assert st.n_images == 7
        i = st.names.index("rot.jpg")
        assert tuple(st.image_size[i]) == (60, 40)


def test_inputs_files_lists_and_stdin(images, tmp_path):
    files = sorted(images.iterdir())
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in files[:2]) + "\n")
    assert [i.name for i in discover([str(lst)])] == [files[0].name, files[1].name]
    r = cli(["extract", "-", "-o", tmp_path / "s.h5", *TEST_BACKBONE], input="\n".join(str(p) for p in files[:3]))
    assert r.exit_code == 0, r.stderr
    with FeatureStore(tmp_path / "s.h5") as st:
        assert st.n_images == 3
    r = cli(["extract", tmp_path / "nothing-here", "-o", tmp_path / "x.h5", *TEST_BACKBONE])
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_batches_group_equal_grids_deterministically():
    grids = [(2, 3), (3, 2), (2, 3), None, (2, 3), (3, 2)]
    assert plan_batches(grids, 2) == [[0, 2], [1, 5], [4]]


def test_store_reader_rejects_wrong_files(images, tmp_path):
    out = tmp_path / "f.h5"
    run_extract(images, out)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    noth5 = tmp_path / "not.h5"
    noth5.write_text("hello")
    incomplete = tmp_path / "inc.h5"
    incomplete.write_bytes(out.read_bytes())
    with h5py.File(incomplete, "r+") as f:
        f.attrs["complete"] = False
    wrongkind = tmp_path / "kind.h5"
    wrongkind.write_bytes(out.read_bytes())
    with h5py.File(wrongkind, "r+") as f:
        f.attrs["kind"] = "concepts"
    newer = tmp_path / "newer.h5"
    newer.write_bytes(out.read_bytes())
    with h5py.File(newer, "r+") as f:
        f.attrs["schema_version"] = 99
    for p, msg in [
        (other, "not one of acseg's"),
        (noth5, "not an HDF5 file"),
        (incomplete, "incomplete"),
        (wrongkind, "holds concepts"),
        (newer, "newer"),
    ]:
        with pytest.raises(AcsegError, match=msg):
            FeatureStore(p)
        r = cli(["fit-acg", p, "-o", tmp_path / "a.pt", "-q"])
        assert r.exit_code == 1, (p, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ") and "Traceback" not in r.stderr


def _slow_extract_script(tmp_path):
    s = tmp_path / "slow.py"
    s.write_text(
        "import sys, time\nimport stages.store as st\norig = st.StoreWriter.append\ndef slow(self, *a, **k):\n    "
        "orig(self, *a, **k); time.sleep(0.15)\nst.StoreWriter.append = slow\nfrom acseg_cli.app import main\nsys.argv "
        "= ['acseg'] + sys.argv[1:]\nmain()\n"
    )
    return s


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    d = tmp_path / "imgs"
    make_images(d, n=24)
    ref = tmp_path / "ref.h5"
    assert run_extract(d, ref, "--batch-size", "2").exit_code == 0
    out = tmp_path / "f.h5"
    args = ["extract", str(d), "-o", str(out), "--batch-size", "2", "--workers", "0", *TEST_BACKBONE]
    script = _slow_extract_script(tmp_path)
    partial = tmp_path / ".f.h5.partial"
    p = subprocess.Popen(
        [sys.executable, str(script), *args], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    done = 0
    while done < 4 and time.time() < deadline and p.poll() is None:  # kill once a few batches are on disk
        time.sleep(0.05)
        try:
            with h5py.File(partial, "r", locking=False) as f:
                done = int(f.attrs.get("n_done", 0))
        except Exception:
            pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists(), "a killed run must leave nothing under the final name"
    assert partial.exists()
    r = cli([*args, "--resume", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["resumed_from"] > 0
    with FeatureStore(ref) as a, FeatureStore(out) as b:
        assert a.names == b.names
        for key in ("tokens", "cls_attn", "offsets", "grid", "image_size"):
            assert np.array_equal(a.read(key), b.read(key)), key
        assert a.attr("content_sha256") == b.attr("content_sha256")


@pytest.mark.slow
def test_real_subprocess_pipe_stdout_is_only_the_path(images, tmp_path):
    out = tmp_path / "f.h5"
    p = subprocess.run(
        [sys.executable, "-m", "acseg_cli", "extract", str(images), "-o", str(out), *TEST_BACKBONE],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{out}\n"
    with FeatureStore(out) as st:
        assert st.attr("command").startswith(f"acseg extract {images} -o {out}")
    p = subprocess.run(
        [sys.executable, "-m", "acseg_cli", "fit-acg", "-o", str(tmp_path / "a.pt")],
        input="",
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "no input: pass FILE or pipe a path" in p.stderr


def test_version_and_help():
    r = cli(["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("acseg ")
    r = cli(["backbones"])
    assert "focus-vits14" in r.stdout and "(default)" in r.stdout


@pytest.mark.slow
def test_a_full_disk_is_one_error_and_the_previous_output_survives(images, tmp_path):
    """A file-size limit (like a full disk) stops the write: exit 1, an Error line, the old file intact."""
    import resource

    out = tmp_path / "f.h5"
    assert run_extract(images, out).exit_code == 0
    before = out.read_bytes()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    # workers 0: DataLoader workers share tensors through files, which the same limit would stop first
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "acseg_cli",
            "extract",
            str(images),
            "-o",
            str(out),
            "--overwrite",
            "--workers",
            "0",
            *TEST_BACKBONE,
        ],
        env=cli_env(),
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("Error: writing f.h5 failed (File too large)") and "disk space" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # no libhdf5/h5py complaints around it
    assert p.stdout == ""
    assert out.read_bytes() == before
    assert not (tmp_path / ".f.h5.partial").exists()


def test_a_second_writer_of_the_same_output_is_refused(images, tmp_path):
    from stages.output import acquire_output_lock, release_output_lock

    out = tmp_path / "f.h5"
    fd = acquire_output_lock(out)  # as another process holding the output
    try:
        r = run_extract(images, out)
        assert r.exit_code == 1 and "another acseg process is writing" in r.stderr
    finally:
        release_output_lock(out, fd)
    assert run_extract(images, out).exit_code == 0


def test_precision_bf16_stays_close_to_fp32_and_is_recorded(images, tmp_path):
    stores = {}
    for p in ("fp32", "bf16", "auto"):
        stores[p] = tmp_path / f"{p}.h5"
        r = run_extract(images, stores[p], "--device", "cpu", "--precision", p)
        assert r.exit_code == 0, r.stderr
    with FeatureStore(stores["fp32"]) as ref, FeatureStore(stores["bf16"]) as st, FeatureStore(stores["auto"]) as au:
        assert ref.params["precision"] == "fp32" and st.params["precision"] == "bf16"
        assert au.params["precision"] == "fp32"  # auto on a CPU
        assert st.backbone["weights_sha256"] == ref.backbone["weights_sha256"]
        for i in range(ref.n_images):
            w, got = ref.tokens(i).astype(np.float32), st.tokens(i).astype(np.float32)
            cos = (got * w).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(w, axis=1))
            assert got.shape == w.shape and cos.min() > 0.98, cos.min()
            assert np.abs(got - w).max() > 0  # bf16 arithmetic, not the fp32 path under another name
            assert np.array_equal(au.tokens(i), ref.tokens(i))


def test_auto_precision_is_bf16_on_a_gpu_and_fp32_on_a_cpu():
    from stages.precision import extract_precision

    assert extract_precision("auto", "cpu") == "fp32" and extract_precision("auto", "cuda:0") == "bf16"
    assert extract_precision("fp32", "cuda") == "fp32"


def test_a_bad_precision_option_writes_nothing(images, tmp_path):
    for bad in ("fp16", "int8"):
        r = run_extract(images, tmp_path / "f.h5", "--precision", bad)
        assert r.exit_code == 2 and "--precision" in r.stderr and not (tmp_path / "f.h5").exists()

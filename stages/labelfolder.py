"""The output folder of the stages that write label maps (classify, refine): one store that names the images,
side files, and one PNG per image; what ``--overwrite`` may replace there (output.py's rules); the patch-level
maps' store; matching the maps to ground truth and drawing previews of them."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np

from .errors import AcsegError
from .images import output_paths
from .output import check_apart, check_output, foreign_entries, temp_folder
from .render import compose_panels, display_size, load_photo, overlay, palette, save_label_png, save_rgb
from .store import STR, Group, Schema, Store, decode_names

log = logging.getLogger("acseg.labels")
CLASSES_FILE = "classes.h5"  # classify's store of patch-level classes in its output folder


def expected_entries(outdir: Path, store_file: str, side_files: tuple = ()) -> set[str]:
    """What such a folder holds: its store, its side files and the label map of each image the store names
    (an unreadable store: the store and side files alone, so its maps count as foreign)."""
    expected = {store_file, *side_files}
    try:
        with h5py.File(outdir / store_file, "r") as f:
            names = decode_names(f["names"][:])
        expected |= {p.relative_to(outdir).as_posix() for p in output_paths(outdir, names, ".png")}
    except Exception:
        pass
    return expected


def prepare_label_folder(
    outdir: Path,
    overwrite: bool,
    inputs: list,
    photos: list,
    *,
    stage: str,
    store_file: str,
    side_files: tuple = (),
) -> Path:
    """Check the output folder and make the partial folder the run writes into (renamed when complete)."""
    check_output(outdir, overwrite, folder=True)
    check_apart(outdir, inputs, folder=True, photos=photos)
    if overwrite and outdir.is_dir():
        foreign = foreign_entries(outdir, expected_entries(outdir, store_file, side_files))
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise AcsegError(
                f"{outdir} holds {foreign[0]}{more}, which {stage} did not write",
                f"move them away or choose another -o (--overwrite replaces only a {stage} output)",
            )
    return temp_folder(outdir)


def label_maps_schema(kind: str) -> Schema:
    """Patch-level class maps of a label folder, per image (classify's ``classes``, refine's ``refined``)."""
    return Schema(
        kind=kind,
        per_image={"grid": (np.int32, (2,)), "image_size": (np.int32, (2,)), "names": (STR, ()), "sources": (STR, ())},
        groups=[Group("offsets", {"class_map": (np.uint16, ())})],
    )


class ClassMapRows:
    """Appends each image's patch-level class map to a label store being written, 64 images per append (each
    append flushes the file), with the per-image fields of ``images`` (grid, image_size, names, sources)."""

    def __init__(self, writer, images):
        self.w, self.images, self.maps, self.start = writer, images, [], 0

    def add(self, class_map: np.ndarray) -> None:
        self.maps.append(np.asarray(class_map).ravel().astype(np.uint16))
        if len(self.maps) == 64:
            self.flush()

    def flush(self) -> None:
        if not self.maps:
            return
        a, b, im = self.start, self.start + len(self.maps), self.images
        self.w.append(
            {
                "grid": im.grid[a:b],
                "image_size": im.image_size[a:b],
                "names": im.names[a:b],
                "sources": im.sources[a:b],
            },
            {"class_map": self.maps},
        )
        self.maps, self.start = [], b


class LabelMapStore(Store):
    """The patch-level class map of each image of a label folder, and its number of classes."""

    kind = "refined"

    def _validate(self) -> None:
        super()._validate()
        self.names = decode_names(self._need("names", 1, self.n_images)[:])
        self.sources = decode_names(self._need("sources", 1, self.n_images)[:])
        self.offsets = self._check_offsets("offsets", "class_map")
        self.grid = self._need("grid", 2, self.n_images, "iu")[:].astype(np.int64)
        self.image_size = self._image_sizes()
        n = self.params.get("n_classes")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 65535:
            raise AcsegError(f"{self.path}: its n_classes is missing or not a whole number", self.DAMAGED)
        self.n_classes = n

    DAMAGED = "the file is damaged; re-run the stage that made it"

    def class_map(self, i: int) -> np.ndarray:
        a, b = self.offsets[i], self.offsets[i + 1]
        m = self._f["class_map"][a:b].astype(np.int64)
        if m.size and m.max() >= self.n_classes:
            raise AcsegError(f"{self.path}: image {self.names[i]!r} has class ids >= {self.n_classes}", self.DAMAGED)
        return m.reshape(self.grid[i])

    @staticmethod
    def open_any(path: Path) -> "LabelMapStore":
        """A classify (``classes``) or refine (``refined``) store, by the kind the file says it holds."""
        try:
            with h5py.File(path, "r") as f:
                kind = f.attrs.get("kind")
        except Exception:
            kind = None
        return ClassStore(path) if kind == "classes" else LabelMapStore(path)


class ClassStore(LabelMapStore):
    """classify's store: the label folder's maps, and the centroids that label new concepts."""

    kind = "classes"

    def _validate(self) -> None:
        p = self.params
        if not isinstance(p.get("background_split"), bool):
            raise AcsegError(f"{self.path}: its background_split is not of the right type", self.DAMAGED)
        super()._validate()
        self.centroids = self._need("centroids", 2, None, "f")[:].astype(np.float32)
        if not np.isfinite(self.centroids).all():
            raise AcsegError(f"{self.path}: centroids hold NaN or Inf", "the file is damaged; re-run classify")
        want = p["n_classes"] - (1 if p["background_split"] else 0)
        # cluster_class: the class of each centroid when classify over-clustered and merged (stages/overcluster.py);
        # files written before it have one centroid per class
        if self.has("cluster_class"):
            lut = self._need("cluster_class", 1, len(self.centroids), "iu")[:].astype(np.int64)
        else:
            lut = np.arange(len(self.centroids), dtype=np.int64)
        if len(self.centroids) < 1 or len(self.centroids) < want or not np.array_equal(np.unique(lut), np.arange(want)):
            raise AcsegError(
                f"{self.path}: {len(self.centroids)} centroids do not map onto its {p.get('n_classes')} classes",
                "the file is damaged; re-run classify",
            )
        self.cluster_class = lut


def _gt_id_of_class(dataset: str | None, class_ids: list, ignore_index: tuple = ()):
    """Class index -> the id the ground-truth PNGs use (a preset's id, its coarse index where no id exists;
    without a preset the id itself), and the id for pixels of unmatched clusters (the preset's or the first
    ``ignore_index``, else 255)."""
    if dataset is None:
        return np.asarray(class_ids, np.int64), (int(ignore_index[0]) if ignore_index else 255)
    from .datasets import get_dataset

    p = get_dataset(dataset)
    lut = p.lut()
    ids = np.full(p.n_classes, -1, np.int64)
    for gid in range(len(lut)):
        c = lut[gid]
        if c >= 0 and ids[c] < 0:
            ids[c] = gid
    if dataset == "cocostuff27":
        ids = np.arange(p.n_classes)  # 27 coarse classes have no single fine id
    return ids, (p.ignore[0] if p.ignore else 255)


def match_to_gt(
    folder: Path, gt: str, dataset: str | None, png_paths: list, n_classes: int, ignore_index: tuple = ()
) -> dict:
    """Hungarian-match cluster ids to the ground truth (score's code) and rewrite maps in class ids.
    Without a preset, the ground truth's ids are the classes, as ``score`` reads them."""
    from PIL import Image

    from .score import score

    res = score(
        str(folder),
        gt,
        dataset=dataset,
        ignore_index=ignore_index,
        protocol="hungarian",
        allow_missing=True,
        resize_pred="nearest",
    )
    gid, ignore = _gt_id_of_class(
        dataset, [int(n) for n in res["class_names"]] if dataset is None else [], ignore_index
    )
    lut = np.full(max(n_classes, 1) + 1, ignore, np.int64)
    for p, c in res["matching"].items():
        if int(p) < len(lut):
            lut[int(p)] = gid[c]
    from .render import palette as pal_fn

    pal = pal_fn(256)
    for p in png_paths:
        a = np.asarray(Image.open(p)).astype(np.int64)
        save_label_png(p, lut[np.minimum(a, len(lut) - 1)], pal)
    log.info("matched to %s: mIoU %.1f, pixel accuracy %.1f", gt, 100 * res["miou"], 100 * res["pixel_accuracy"])
    return res


def _class_names(dataset: str | None, matched: bool):
    """id -> name for the legend: a preset's class names for its ground-truth ids, else 'class N' for ids of
    plain ground truth, or 'cluster N' for unmatched cluster ids."""
    lut = names = None
    if dataset and matched:
        from .datasets import get_dataset

        p = get_dataset(dataset)
        lut, names = p.lut(), p.class_names

    def name(i: int) -> str:
        if lut is not None:
            c = int(lut[i]) if i < len(lut) else -2
            return names[c] if c >= 0 else "ignored" if c == -1 else f"id {i}"
        return f"class {i}" if matched else f"cluster {i}"

    return name


def draw_previews(targets: list[Path], store, png_paths: list, gt: str | None, dataset: str | None, res) -> None:
    """One picture per image: photo | prediction (| ground truth), captioned, with a legend of the classes in
    it (named by the preset when the maps were matched to one)."""
    from PIL import Image

    pal = palette(256)
    name = _class_names(dataset, res is not None)
    for i, p in enumerate(png_paths):
        size = display_size(tuple(store.image_size[i]))
        pred = np.asarray(Image.open(p).resize((size[1], size[0]), Image.NEAREST)).astype(np.int64)
        photo = load_photo(store.sources[i], size)
        panels = [photo if photo is not None else np.zeros((*size, 3), np.uint8), overlay(None, pred, pal)]
        captions = ["photo" if photo is not None else "photo (not readable)", "prediction"]
        ids = set(np.unique(pred).tolist())
        if gt:
            g = Path(gt) / Path(store.names[i]).with_suffix(".png")
            if g.is_file():
                ga = np.asarray(Image.open(g).resize((size[1], size[0]), Image.NEAREST)).astype(np.int64)
                panels.append(overlay(None, ga, pal))
                captions.append("ground truth")
                ids |= set(np.unique(ga).tolist())
        legend = [(name(j), tuple(pal[j % len(pal)])) for j in sorted(ids)]
        save_rgb(targets[i], compose_panels(panels, captions, legend))

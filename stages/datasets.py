"""Label conventions of the field's datasets: class names, ignore labels and id mappings for ``score``.

Each preset turns a ground-truth PNG's ids into class indices 0..K-1, or -1 for ignored pixels. An id
that is neither a class nor ignored is an error (it means the wrong preset or a damaged label map).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import AcsegError

LUT_SIZE = 65536
INVALID = -2
IGNORE = -1

# the class tables, laid out by hand
# fmt: off
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian",
                  "bicyclist"]
CITYSCAPES27_CLASSES = ["road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
                        "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
                        "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
                        "motorcycle", "bicycle"]
# STEGO's 27 coarse COCO-Stuff classes (12 thing groups, then 15 stuff groups).
COCOSTUFF27_CLASSES = ["electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory",
                       "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff",
                       "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building", "ground", "plant",
                       "sky", "solid", "structural", "water"]
# COCO-Stuff's 182 fine ids (0-based, as in the stuffthingmaps PNGs) -> the 27 coarse classes above.
COCOSTUFF_FINE_TO_COARSE = [
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6,
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
    3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15,
    25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22,
    21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24,
    20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18,
    18, 26, 26, 19, 19, 24
]
# ADE20K SceneParsing150 (objectInfo150.txt, first name of each row); PNG id i is class i-1, 0 is void.
ADE20K_CLASSES = [
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence',
    'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
    'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray',
    'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator',
    'glass', 'clock', 'flag'
]
# fmt: on


@dataclass(frozen=True)
class DatasetPreset:
    name: str
    class_names: tuple
    ignore: tuple
    description: str

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def lut(self) -> np.ndarray:
        """Ground-truth id -> class index (or IGNORE / INVALID)."""
        lut = np.full(LUT_SIZE, INVALID, np.int32)
        if self.name == "cocostuff27":
            lut[:182] = COCOSTUFF_FINE_TO_COARSE
        elif self.name == "cityscapes27":
            lut[:7] = IGNORE
            lut[7:34] = np.arange(27)
        elif self.name == "ade20k":
            lut[1:151] = np.arange(150)
        else:
            lut[: self.n_classes] = np.arange(self.n_classes)
        for i in self.ignore:
            lut[i] = IGNORE
        return lut


DATASETS = {
    p.name: p
    for p in [
        DatasetPreset("voc", tuple(VOC_CLASSES), (255,), "PASCAL VOC 2012: 21 classes, 255 void"),
        DatasetPreset(
            "cocostuff27", tuple(COCOSTUFF27_CLASSES), (255,), "COCO-Stuff: 182 fine ids -> 27 coarse, 255 unlabelled"
        ),
        DatasetPreset(
            "cityscapes27",
            tuple(CITYSCAPES27_CLASSES),
            (255,),
            "Cityscapes labelIds - 7 (27 classes), ids 0-6 and 255 void",
        ),
        DatasetPreset("camvid11", tuple(CAMVID_CLASSES), (11,), "CamVid (SegNet): 11 classes, 11 void"),
        DatasetPreset("ade20k", tuple(ADE20K_CLASSES), (0,), "ADE20K SceneParsing: 150 classes, 0 void"),
    ]
}


def get_dataset(name: str) -> DatasetPreset:
    if name not in DATASETS:
        raise AcsegError(f"unknown dataset preset {name!r}", f"choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def plain_lut(ignore: tuple = ()) -> np.ndarray:
    """No preset: every id is its own class, but for the ignored ones."""
    lut = np.arange(LUT_SIZE, dtype=np.int32)
    for i in ignore:
        lut[i] = IGNORE
    return lut

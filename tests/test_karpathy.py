import json

import pytest
import torch
from PIL import Image

from vlfast.data.karpathy import KarpathyDataset, load_annotations


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name, colour in (("a.jpg", "red"), ("b.jpg", "blue"), ("c.png", "green")):
        Image.new("RGB", (40, 30), colour).save(root / name)
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def write(tmp_path, name, entries):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def test_train_and_test_entries(tmp_path, image_root):
    train = write(tmp_path, "train.json", [
        {"image": "a.jpg", "caption": "a red picture", "image_id": "flickr_7"},
        {"image": "a.jpg", "caption": "red again", "image_id": "flickr_7"},
        {"image": "c.png", "caption": "green", "image_id": "flickr_9"},
    ])
    data = KarpathyDataset(train, image_root, "train", image_size=32)
    items = [data[i] for i in range(len(data))]
    assert [item["image_id"] for item in items] == [0, 0, 1]
    assert items[0]["image"].shape == (3, 32, 32) and items[0]["image"].dtype == torch.float32
    assert items[1]["caption"] == "red again"

    test = write(tmp_path, "test.json", [{"image": "b.jpg", "caption": ["blue", "a blue one"]}])
    item = KarpathyDataset(test, image_root, "test", image_size=16)[0]
    assert item["caption"] == ["blue", "a blue one"] and item["image_id"] == 0


def test_test_images_are_squashed_to_the_square_not_cropped(tmp_path, image_root):
    # A 4-pixel green stripe at the left edge of a 40×30 blue image: squashed to 16×16 it stays
    # the first column; a centre crop to the square (5 pixels off each side) would lose it.
    image = Image.new("RGB", (40, 30), "blue")
    image.paste("lime", (0, 0, 4, 30))
    image.save(image_root / "stripe.png")
    test = write(tmp_path, "test.json", [{"image": "stripe.png", "caption": ["a stripe"]}])
    pixels = KarpathyDataset(test, image_root, "test", image_size=16)[0]["image"]
    green, blue = pixels[:, :, 0].mean(dim=1), pixels[:, :, 15].mean(dim=1)
    assert green[1] > green[2] + 1 and blue[2] > blue[1] + 1, (green, blue)  # normalised: G over B, then B over G


def test_unreadable_images_are_skipped_and_counted(tmp_path, image_root):
    path = write(tmp_path, "train.json", [
        {"image": "missing.jpg", "caption": "gone", "image_id": 1},
        {"image": "broken.jpg", "caption": "broken", "image_id": 2},
        {"image": "b.jpg", "caption": "blue", "image_id": 3},
    ])
    data = KarpathyDataset(path, image_root, "train", image_size=16)
    item = data[0]
    assert item["caption"] == "blue"  # the next readable entry is served, naming what it replaces
    assert item["skipped"] == [str(image_root / "missing.jpg"), str(image_root / "broken.jpg")]
    assert data.skipped == [str(image_root / "missing.jpg"), str(image_root / "broken.jpg")]
    only_bad = write(tmp_path, "bad.json", [{"image": "missing.jpg", "caption": "gone", "image_id": 1}])
    with pytest.raises(RuntimeError, match="no readable image"):
        KarpathyDataset(only_bad, image_root, "train")[0]


@pytest.mark.parametrize("split, entries, message", [
    ("train", [{"image": "a.jpg", "caption": "", "image_id": 1}], "entry 0 .* non-empty 'caption' string"),
    ("train", [{"image": "a.jpg", "caption": "x", "image_id": 1}, {"caption": "y", "image_id": 2}],
     "entry 1 .* needs an 'image' path"),
    ("train", [{"image": "a.jpg", "caption": "x"}], "needs an 'image_id'"),
    ("test", [{"image": "a.jpg", "caption": "one string"}], "list of non-empty strings"),
    ("test", [], "non-empty JSON list"),
])
def test_malformed_annotations_stop_with_the_entry(tmp_path, split, entries, message):
    with pytest.raises(ValueError, match=message):
        load_annotations(write(tmp_path, "ann.json", entries), split)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text('[{"image": "a.jpg",')
    with pytest.raises(ValueError, match="ann.json: not valid JSON"):
        load_annotations(path, "train")


def test_pretraining_corpus_files_with_caption_lists_and_absolute_paths(tmp_path, image_root):
    first = write(tmp_path, "coco.json", [{"image": "a.jpg", "caption": ["red", "a red one", "crimson"]}])
    second = write(tmp_path, "cc3m.json", [{"image": str(image_root / "b.jpg"), "caption": "blue"}])
    data = KarpathyDataset([first, second], image_root, "pretrain", image_size=16)
    assert len(data) == 2 and data[1]["caption"] == "blue" and data[1]["image_id"] == 1
    torch.manual_seed(0)
    drawn = {data[0]["caption"] for _ in range(40)}
    assert drawn == {"red", "a red one", "crimson"}  # one caption per visit, every one in turn
    assert KarpathyDataset([second], None, "pretrain", image_size=16)[0]["caption"] == "blue"  # no root needed
    with pytest.raises(ValueError, match="coco.json: entry 0 .* a pretrain entry needs 'caption'"):
        load_annotations(write(tmp_path, "coco.json", [{"image": "a.jpg", "caption": []}]), "pretrain")
    with pytest.raises(ValueError, match="split must be train, val, test or pretrain"):
        KarpathyDataset(first, image_root, "pretraining")


def test_annotations_are_packed_and_a_wrong_root_stops_early(tmp_path, image_root):
    from vlfast.data.karpathy import MAX_SKIPS_IN_A_ROW, PackedStrings

    texts = ["", "a café", "二匹の猫", "x" * 500]
    packed = PackedStrings(texts)
    assert len(packed) == 4 and [packed[i] for i in range(4)] == texts
    entries = [{"image": f"img{i}.jpg", "caption": [f"c{i}", f"d{i}"]} for i in range(3 * MAX_SKIPS_IN_A_ROW)]
    data = KarpathyDataset(write(tmp_path, "test.json", entries), tmp_path / "not-the-root", "test")
    assert data.caption(7) == ["c7", "d7"] and data.image_ids.dtype.kind == "i"
    with pytest.raises(RuntimeError, match=f"{MAX_SKIPS_IN_A_ROW} in a row could not be read.*img5.jpg.*image_root"):
        data[5]

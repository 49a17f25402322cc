import numpy as np
import pytest
import torch

from vlfast.data import SyntheticImageText, write_vocab
from vlfast.data.synthetic import COLOURS, SHAPES, SIZES, relation

transformers = pytest.importorskip("transformers")


def test_deterministic_and_split_dependent():
    a, b = SyntheticImageText("train", images=5, seed=3), SyntheticImageText("train", images=5, seed=3)
    for i in range(len(a)):
        assert a[i]["caption"] == b[i]["caption"] and torch.equal(a[i]["image"], b[i]["image"])
    other_seed = SyntheticImageText("train", images=5, seed=4)
    test = SyntheticImageText("test", images=5, seed=3)
    assert [a.captions(i) for i in range(5)] != [other_seed.captions(i) for i in range(5)]
    assert [a.captions(i) for i in range(5)] != [test.captions(i) for i in range(5)]
    # Images do not depend on how many captions are drawn.
    assert torch.equal(SyntheticImageText("train", images=5, captions_per_image=1, seed=3).image(2), a.image(2))


def test_entries_follow_the_karpathy_layout():
    train = SyntheticImageText("train", images=4, image_size=32, captions_per_image=3)
    test = SyntheticImageText("test", images=4, image_size=32, captions_per_image=3)
    assert len(train) == 12 and len(test) == 4
    entry = train[7]
    assert entry["image_id"] == 2 and isinstance(entry["caption"], str)
    assert entry["image"].shape == (3, 32, 32) and entry["image"].dtype == torch.float32
    assert isinstance(test[1]["caption"], list) and len(test[1]["caption"]) == 3
    with pytest.raises(IndexError):
        train[12]
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticImageText("validation")


def test_captions_describe_the_scene():
    data = SyntheticImageText("test", images=50, captions_per_image=2, seed=1)
    for index in range(50):
        objects = data.scene(index)
        phrases = {o.phrase(): o for o in objects}
        for text in data.captions(index):
            first = next(p for p in phrases if text.startswith(p))
            rest = text[len(first) + 1:]
            rel = next(r for r in ("left of", "right of", "above", "below") if rest.startswith(r))
            second = next(p for p in phrases if rest[len(rel) + 1:].startswith(p))
            assert relation(phrases[first], phrases[second]) == rel, text


def test_images_show_the_colours_of_their_objects():
    data = SyntheticImageText("test", images=20, image_size=64, seed=2)
    for index in range(20):
        pixels = ((data.image(index) * 0.25 + 0.45) * 255).round().permute(1, 2, 0).reshape(-1, 3)
        for obj in data.scene(index):
            colour = torch.tensor(COLOURS[obj.colour], dtype=pixels.dtype)
            assert (pixels - colour).abs().amax(dim=1).le(1).sum() > 20, (index, obj)


def test_vocabulary_tokenizes_every_caption(tmp_path):
    tokenizer = transformers.BertTokenizerFast.from_pretrained(write_vocab(tmp_path))
    data = SyntheticImageText("train", images=100)
    ids = tokenizer([data[i]["caption"] for i in range(len(data))])["input_ids"]
    assert tokenizer.unk_token_id not in {t for row in ids for t in row}
    assert len(tokenizer) == 5 + 7 + len(SHAPES) + len(COLOURS) + len(SIZES)


def test_val_split_is_its_own_and_a_saved_render_loads_as_the_item_image(tmp_path):
    from PIL import Image

    from vlfast.data.synthetic import render, transform

    val, test = SyntheticImageText("val", images=3, image_size=32), SyntheticImageText("test", images=3, image_size=32)
    assert [val.captions(i) for i in range(3)] != [test.captions(i) for i in range(3)]
    # retrieve.py search reads user image files through `transform`: a PNG of a render must
    # become the tensor the dataset gives for it (up to the PNG's 8-bit rounding: none).
    rng = np.random.default_rng((0, 1, 2, 1))  # the stream SyntheticImageText.image uses for test image 2
    Image.fromarray(render(test.scene(2), 32, rng)).save(tmp_path / "scene.png")
    with Image.open(tmp_path / "scene.png") as image:
        torch.testing.assert_close(transform(32)(image.convert("RGB")), test.image(2))


def test_a_reader_never_sees_a_half_written_vocabulary(tmp_path):
    """Every rank of a torchrun run writes the vocabulary into the same folder while the others
    load it (a rank that read it half-written built a smaller embedding and failed to resume)."""
    import multiprocessing

    full = (write_vocab(tmp_path) / "vocab.txt").read_text()
    context = multiprocessing.get_context("spawn")
    writing = context.Event()
    writer = context.Process(target=_write_vocab_repeatedly, args=(tmp_path, 3000, writing))
    writer.start()
    assert writing.wait(timeout=120), "the writer never started"
    reads = []
    while writer.is_alive():
        reads.append((tmp_path / "vocab.txt").read_text())
    writer.join()
    assert writer.exitcode == 0 and len(reads) > 10
    assert all(read == full for read in reads), sorted({len(read) for read in reads})


def _write_vocab_repeatedly(directory, times, writing):
    write_vocab(directory)
    writing.set()  # the reads count from here: the child's imports took longer than many of them
    for _ in range(times):
        write_vocab(directory)

"""vlfast.data.shards on shards the tests write: img2dataset's layout (key.jpg/png/webp, key.txt,
key.json), every sample once per epoch across ranks and workers, the same order for the same
seed, exact resume, bad data skipped and named, and the converter from ALBEF's format."""
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torchvision import transforms

from vlfast.data.shards import (BatchInfo, Position, ShardPlan, ShardStream, expand, make_plan, stable_id,
                                write_shards)

TRANSFORM = transforms.Compose([transforms.RandomResizedCrop(8, scale=(0.5, 1.0)), transforms.ToTensor()])


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(12, 12, 3, generator=g) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write(folder: Path, shards: int, per_shard: int, prefix: str = "s") -> list:
    """``shards`` shards of ``per_shard`` good samples, alternating img2dataset's caption forms
    (.txt and .json, or .json alone) and image formats; returns the keys."""
    keys = []
    for shard in range(shards):
        with tarfile.open(folder / f"{prefix}{shard:03d}.tar", "w") as tar:
            for index in range(per_shard):
                key = f"{prefix}{shard:03d}_{index:04d}"
                number = shard * per_shard + index
                extension, fmt = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))[number % 3]
                add(tar, f"{key}.{extension}", image_bytes(number, fmt))
                if number % 2:
                    add(tar, f"{key}.txt", f"caption {key}".encode())
                add(tar, f"{key}.json", json.dumps({"caption": f"caption {key}", "key": key}).encode())
                keys.append(key)
    return keys


def collate(items):
    return (torch.stack([item["image"] for item in items]), None, None,
            torch.tensor([item["image_id"] for item in items]), BatchInfo())


def ids_of(keys):
    return {stable_id(key): key for key in keys}


def read(stream: ShardStream, batches: int, workers: int = 0):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == batches:
            return out
    return out


def test_every_sample_once_an_epoch_in_a_seeded_order(tmp_path):
    keys = write(tmp_path, shards=4, per_shard=6)
    plan = make_plan([str(tmp_path / "s{000..003}.tar")], seed=3)
    batches = read(ShardStream(plan, TRANSFORM, collate, batch_size=4), batches=6)  # one epoch: 24 samples
    names = ids_of(keys)
    seen = [names[int(i)] for batch in batches for i in batch[3]]
    assert sorted(seen) == sorted(keys)
    again = read(ShardStream(plan, TRANSFORM, collate, batch_size=4), batches=6)
    for first, second in zip(batches, again):  # the same seed, the same batches (augmentation included)
        torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)
        assert first[4] == second[4]
    next_epoch = read(ShardStream(plan, TRANSFORM, collate, batch_size=4), batches=12)[6:]
    assert sorted(names[int(i)] for batch in next_epoch for i in batch[3]) == sorted(keys)
    assert [names[int(i)] for batch in next_epoch for i in batch[3]] != seen  # another order
    other = read(ShardStream(make_plan([str(tmp_path / "s{000..003}.tar")], seed=4), TRANSFORM, collate, 4), 6)
    assert [int(i) for batch in other for i in batch[3]] != [int(i) for batch in batches for i in batch[3]]


def _two_ranks(rank, folder, out):
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    plan = make_plan([f"{folder}/s{{000..007}}.tar"], seed=0)
    stream = ShardStream(plan, TRANSFORM, collate, batch_size=3, rank=dist.get_rank(), world=dist.get_world_size())
    batches = read(stream, batches=8, workers=2)  # 8 shards x 6 samples / (2 ranks x 3 per batch): 8 batches each
    torch.save([int(i) for batch in batches for i in batch[3]], f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_two_gloo_ranks_with_two_workers_see_every_key_once(tmp_path):
    keys = write(tmp_path, shards=8, per_shard=6)
    mp.spawn(_two_ranks, args=(str(tmp_path), str(tmp_path / "keys")), nprocs=2)
    seen = [key for rank in range(2) for key in torch.load(f"{tmp_path / 'keys'}.{rank}")]
    assert len(seen) == len(set(seen)) == len(keys)
    assert set(seen) == set(ids_of(keys))


def test_fewer_shards_than_streams_is_an_error_unless_resampled(tmp_path):
    write(tmp_path, shards=3, per_shard=2)
    plan = make_plan([str(tmp_path / "s{000..002}.tar")], seed=0)
    with pytest.raises(ValueError, match=r"3 shard visits an epoch for 4 streams .* data.resample_shards=true"):
        plan.check(4)
    resampled = make_plan([str(tmp_path / "s{000..002}.tar")], seed=0, resample=True)
    resampled.check(4)
    assert all(len(resampled.stream_shards(0, stream, 4)) == 1 for stream in range(4))


def test_sources_with_weights_share_the_visits(tmp_path):
    write(tmp_path, shards=4, per_shard=1, prefix="a")
    write(tmp_path, shards=4, per_shard=1, prefix="b")
    plan = make_plan([str(tmp_path / "a{000..003}.tar"), str(tmp_path / "b{000..003}.tar")], seed=0,
                     weights=[1, 3], resample=True)
    visits = [Path(url).name[0] for epoch in range(50) for url in plan.epoch_order(epoch)]
    assert visits.count("b") == 3 * visits.count("a")  # 2 and 6 of each epoch's 8 visits
    with pytest.raises(ValueError, match="one weight > 0 per source"):
        ShardPlan(plan.sources, 0, [1.0]).check(1)
    # Weights without resampling: an epoch's visits (2 + 1 + 1 of sources of 2, 1 and 1 shards)
    # must cover the streams, or a stream would get no shard
    uneven = ShardPlan([plan.sources[0][:2], plan.sources[1][:1], plan.sources[0][2:3]], 0, [1, 1, 1])
    with pytest.raises(ValueError, match="3 shard visits an epoch for 4 streams"):
        uneven.check(4)
    uneven.check(3)
    assert sorted(len(uneven.stream_shards(0, stream, 3)) for stream in range(3)) == [1, 1, 1]


def cut_shard(path: Path, good: int = 2) -> None:
    """A shard of ``good`` samples, one bad one, and a last member cut short (a failed upload)."""
    with tarfile.open(path, "w") as tar:
        for index in range(good):
            add(tar, f"cut{index}.png", image_bytes(100 + index))
            add(tar, f"cut{index}.txt", b"a caption")
        add(tar, "nocaption.png", image_bytes(99))
        add(tar, "last.png", image_bytes(98) * 40)
    with tarfile.open(path) as tar:
        last = tar.getmember("last.png")
        middle = last.offset_data + last.size // 2
    path.write_bytes(path.read_bytes()[:middle])


@pytest.mark.parametrize("bad", [False, True], ids=["good", "with_a_cut_shard"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_with_the_same_batches(tmp_path, workers, bad):
    """Stopped after 5 batches (mid-shard, mid-epoch), resumed from the positions of the batches
    taken, with the workers rotated: the next batches equal the uninterrupted run's, their skips
    too (the replayed part of a shard reports none again)."""
    write(tmp_path, shards=4, per_shard=7)
    shards = [str(tmp_path / f"s{index:03d}.tar") for index in range(4)]
    if bad:
        cut_shard(tmp_path / "cut.tar")
        shards.append(str(tmp_path / "cut.tar"))
    plan = make_plan([shards], seed=1)
    whole = read(ShardStream(plan, TRANSFORM, collate, batch_size=3, shuffle_buffer=4), batches=14, workers=workers)
    positions = {}
    for batch in whole[:5]:
        positions[batch[4].stream] = batch[4].position
    resumed = read(ShardStream(plan, TRANSFORM, collate, batch_size=3, shuffle_buffer=4, start=positions,
                               first_worker=5 % max(1, workers)), batches=9, workers=workers)
    for want, got in zip(whole[5:], resumed):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        assert torch.equal(got[3], want[3]) and got[4] == want[4]


def test_bad_samples_are_skipped_and_named_and_a_cut_shard_keeps_its_good_samples(tmp_path):
    keys = write(tmp_path, shards=1, per_shard=4)
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        add(tar, "corrupt.jpg", b"not an image")
        add(tar, "corrupt.txt", b"a caption")
        add(tar, "nocaption.png", image_bytes(1))
        add(tar, "notext.png", image_bytes(2))
        add(tar, "notext.json", json.dumps({"caption": 7}).encode())
        add(tar, "latin1.png", image_bytes(3))
        add(tar, "latin1.txt", "caf\xe9".encode("latin-1"))
        add(tar, "good.png", image_bytes(4))
        add(tar, "good.txt", b"a good caption")
        add(tar, "cut.png", image_bytes(5) * 40)
    with tarfile.open(tmp_path / "bad.tar") as tar:
        cut = tar.getmember("cut.png")
        middle = cut.offset_data + cut.size // 2
    data = (tmp_path / "bad.tar").read_bytes()
    (tmp_path / "bad.tar").write_bytes(data[:middle])  # the last member cut short, as a failed upload
    plan = make_plan([[str(tmp_path / "s000.tar"), str(tmp_path / "bad.tar")]], seed=0)
    batches = read(ShardStream(plan, TRANSFORM, collate, batch_size=1), batches=10)  # two epochs of 5 good samples
    names = ids_of(keys + ["good"])
    assert sorted(names[int(batch[3])] for batch in batches[:5]) == sorted(keys + ["good"])
    skips = [skip for batch in batches for skip in batch[4].skips]
    assert sum(batch[4].skipped for batch in batches) == len(skips)
    reasons = {skip["key"]: skip["reason"] for skip in skips}
    assert len(reasons) == 5 and 5 <= len(skips) <= 10  # each epoch skips the same five (the last ones may come after)
    assert reasons["corrupt"].startswith("unreadable image")
    assert reasons["nocaption"].startswith("no caption")
    assert reasons["notext"] == "caption is not text: int"
    assert reasons["latin1"] == "caption is not UTF-8 text"
    assert reasons[None].startswith("tar cut short")
    assert {skip["shard"] for skip in skips} == {str(tmp_path / "bad.tar")}


def test_a_stream_of_bad_shards_stops_instead_of_spinning(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        add(tar, "a.png", image_bytes(1))  # no caption
    plan = make_plan([str(tmp_path / "bad.tar")], seed=0)
    with pytest.raises(RuntimeError, match=r"stream 0's shards of epoch 0 hold no sample \(.*bad\.tar"):
        read(ShardStream(plan, TRANSFORM, collate, batch_size=1), batches=1)


def test_read_errors_that_are_not_bad_data_stop_the_run_naming_the_shard(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    plan = make_plan([str(tmp_path / "empty.tar")], seed=0)
    with pytest.raises(RuntimeError, match=r"shard .*empty\.tar: reading it failed: ReadError"):
        read(ShardStream(plan, TRANSFORM, collate, batch_size=1), batches=1)


def test_missing_shards_and_failing_commands_are_named(tmp_path):
    write(tmp_path, shards=2, per_shard=2)
    with pytest.raises(ValueError, match=r"1 of 3 shards are not files, e\.g\. .*s002\.tar"):
        expand([str(tmp_path / "s{000..002}.tar")])
    with pytest.raises(ValueError, match="names no shard"):
        expand([])
    piped = make_plan([f"pipe:cat {tmp_path / 's000.tar'}", f"pipe:cat {tmp_path / 's001.tar'}"], seed=0)
    assert len(read(ShardStream(piped, TRANSFORM, collate, batch_size=4), batches=1)[0][3]) == 4
    failing = make_plan(["pipe:exit 3"], seed=0)
    with pytest.raises(RuntimeError, match="shard pipe:exit 3: reading it failed"):
        read(ShardStream(failing, TRANSFORM, collate, batch_size=1), batches=1)


def test_albef_json_converts_to_shards_that_read_back_the_same_pairs(tmp_path):
    from vlfast.data.synthetic import SyntheticImageText

    data = SyntheticImageText("train", images=7, image_size=16, captions_per_image=2)
    (tmp_path / "images").mkdir()
    entries = []
    for index in range(len(data)):
        pixels = ((data[index]["image"].permute(1, 2, 0) * 40 + 110).clamp(0, 255)).to(torch.uint8).numpy()
        name = f"{index}.png"
        Image.fromarray(pixels).save(tmp_path / "images" / name)
        entries.append({"image": name, "caption": data[index]["caption"]})
    entries.append({"image": "missing.png", "caption": "gone"})
    (tmp_path / "pretrain.json").write_text(json.dumps(entries))
    result = write_shards([str(tmp_path / "pretrain.json")], str(tmp_path / "images"), tmp_path / "shards",
                          samples_per_shard=5, progress=False)
    assert (result["shards"], result["samples"], len(result["skipped"])) == (3, 14, 1)
    plan = make_plan([str(tmp_path / "shards" / "{000000..000002}.tar")], seed=0)
    as_tensor = transforms.ToTensor()
    batches = read(ShardStream(plan, as_tensor, lambda items: (items, None, None, None), batch_size=14), batches=1)
    indices = [stable_key(item, entries) for item in batches[0][0]]
    assert sorted(indices) == list(range(14))
    for item, index in zip(batches[0][0], indices):  # the same caption and the same pixels (PNG is lossless)
        assert item["caption"] == entries[index]["caption"]
        torch.testing.assert_close(item["image"], as_tensor(Image.open(tmp_path / "images" / entries[index]["image"])))


def stable_key(item, entries) -> int:
    """The entry index of a read item: its key is the 9-digit index the converter gave it."""
    return next(index for index in range(len(entries)) if stable_id(f"{index:09d}") == item["image_id"])

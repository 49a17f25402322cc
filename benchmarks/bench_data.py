"""Samples per second per loader worker: the shard loader (vlfast.data.shards) against the JSON +
image files loader (vlfast.data.karpathy's pretrain split, ALBEF's format), on the same JPEGs
(500×375, as COCO's, quality 90), each decoded and augmented as pretraining does (random resized
crop to 256 px, flip, normalise), in one process: what one DataLoader worker delivers.

    pytest benchmarks/bench_data.py --benchmark-enable --benchmark-json=data.json

bench_loader: the two loaders, 128 samples each a round, in turn (shards of 64; files on local
disk, warm in the page cache, as shards are: the difference is the per-file opens and the tar
reads, not the disk), on one thread as a worker runs.
bench_decode: where a sample's time goes, per image: PIL's decode alone, PIL's decode with the
augmentation, torchvision.io.decode_jpeg (libjpeg-turbo, to a tensor) with the same augmentation,
and PIL's draft mode (the JPEG decoded at 1/2, 1/4 or 1/8 scale where the crop keeps at least
256 px both ways: a COCO image is never large enough at 256 px, so draft decodes it whole).
bench_decode_cuda_batched (CUDA): a batch of 32 decoded on the GPU and augmented there.
extra_info: samples/s (per worker).
"""
import io
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from timing import in_turn
from vlfast.data.karpathy import MEAN, STD, KarpathyDataset, train_transform
from vlfast.data.shards import ShardStream, make_plan, write_shards

SIZE, WIDTH, HEIGHT = 256, 500, 375
SAMPLES, PER_SHARD = 128, 64


def photo_like(seed: int) -> bytes:
    """A 500×375 JPEG with a photo's spread of detail: smooth colour fields, edges and noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(HEIGHT, WIDTH), mode="bicubic")
    edges = (torch.rand(1, 3, HEIGHT // 25, WIDTH // 25, generator=g) > 0.7).float()
    edges = torch.nn.functional.interpolate(edges, size=(HEIGHT, WIDTH), mode="nearest")
    pixels = (0.6 * low + 0.25 * edges + 0.15 * torch.rand(1, 3, HEIGHT, WIDTH, generator=g)).clamp(0, 1)
    buffer = io.BytesIO()
    Image.fromarray((pixels[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """SAMPLES JPEGs as files with an ALBEF-format JSON, and the same as shards of PER_SHARD."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "images").mkdir()
    entries = []
    for index in range(SAMPLES):
        (folder / "images" / f"{index}.jpg").write_bytes(photo_like(index))
        entries.append({"image": f"{index}.jpg", "caption": f"a photo number {index}"})
    (folder / "pretrain.json").write_text(json.dumps(entries))
    write_shards([str(folder / "pretrain.json")], str(folder / "images"), folder / "shards", PER_SHARD, progress=False)
    return folder


def collate(items):
    return torch.stack([item["image"] for item in items]), None, None, None, None


def shard_loader(folder: Path):
    plan = make_plan([str(folder / "shards" / "{000000..000001}.tar")], seed=0)
    stream = ShardStream(plan, train_transform(SIZE), collate, batch_size=16).batches(0, 1, (0, 0, 0))
    return lambda: [next(stream) for _ in range(SAMPLES // 16)]


def files_loader(folder: Path):
    dataset = KarpathyDataset(str(folder / "pretrain.json"), str(folder / "images"), "pretrain", image_size=SIZE)
    return lambda: [collate([dataset[i] for i in range(start, start + 16)]) for start in range(0, SAMPLES, 16)]


LOADERS = {"shards": shard_loader, "json_files": files_loader}


@pytest.fixture
def one_thread():
    """As in a DataLoader worker, which torch runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("device", ["cpu"])  # a loader worker's work is the CPU's
def bench_loader(benchmark, corpus, device, one_thread):
    """Paired: each round runs both loaders over the 128 samples, in turn (the first alternating);
    extra_info has each one's samples/s (median over rounds) and the median of the rounds' ratios."""
    runs = {name: LOADERS[name](corpus) for name in LOADERS}
    rounds = []

    def pair():
        rounds.append(in_turn(runs, reverse=len(rounds) % 2 == 1, device="cpu"))

    pair()  # warm: the files and shards in the page cache, the decoders loaded
    benchmark(pair)
    if benchmark.stats:
        for name in LOADERS:
            benchmark.extra_info[f"{name} samples/s"] = round(SAMPLES / statistics.median(r[name] for r in rounds[1:]), 1)
        benchmark.extra_info["json_files/shards time"] = round(
            statistics.median(r["json_files"] / r["shards"] for r in rounds[1:]), 3)


AUGMENT = transforms.Compose([transforms.RandomResizedCrop(SIZE, scale=(0.5, 1.0),
                                                           interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.RandomHorizontalFlip()])
NORMALISE = transforms.Normalize(MEAN, STD)


def pil_decode(data: bytes):
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def pil_augmented(data: bytes):
    return NORMALISE(transforms.functional.to_tensor(AUGMENT(pil_decode(data))))


def torchvision_augmented(data: bytes):
    pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return NORMALISE(AUGMENT(pixels).float() / 255)


def pil_draft_augmented(data: bytes):
    """The crop drawn on the full size, the JPEG decoded at the smallest DCT scale that keeps the
    crop at least SIZE px both ways (draft), the crop scaled to that decode."""
    with Image.open(io.BytesIO(data)) as image:
        top, left, height, width = transforms.RandomResizedCrop.get_params(image, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
        scale = max((s for s in (8, 4, 2, 1) if height / s >= SIZE and width / s >= SIZE), default=1)
        if scale > 1:
            image.draft("RGB", (image.width // scale, image.height // scale))
        factor = image.width / WIDTH
        image = image.convert("RGB")
        box = [round(v * factor) for v in (left, top, left + width, top + height)]
        pixels = image.resize((SIZE, SIZE), Image.BICUBIC, box=box)
    return NORMALISE(transforms.functional.to_tensor(transforms.RandomHorizontalFlip()(pixels)))


DECODERS = {"pil_decode_only": pil_decode, "pil_augmented": pil_augmented,
            "torchvision_decode_jpeg_augmented": torchvision_augmented, "pil_draft_augmented": pil_draft_augmented}


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("decoder", DECODERS)
def bench_decode(benchmark, corpus, decoder, device, one_thread):
    images = [(corpus / "images" / f"{index}.jpg").read_bytes() for index in range(32)]
    decode = DECODERS[decoder]
    benchmark(lambda: [decode(data) for data in images])
    if benchmark.stats:
        benchmark.extra_info["samples/s"] = round(len(images) / benchmark.stats.stats.median, 1)


@pytest.mark.cuda
def bench_decode_cuda_batched(benchmark, corpus):
    """A card's alternative: the main process decodes a batch of JPEGs on the GPU (nvJPEG through
    torchvision.io.decode_jpeg with a list) and augments there, the workers only read bytes."""
    images = [torch.frombuffer(bytearray((corpus / "images" / f"{index}.jpg").read_bytes()), dtype=torch.uint8)
              for index in range(32)]
    mean, std = torch.tensor(MEAN, device="cuda")[:, None, None], torch.tensor(STD, device="cuda")[:, None, None]

    def run():
        decoded = decode_jpeg(images, mode=ImageReadMode.RGB, device="cuda")
        batch = torch.stack([AUGMENT(pixels) for pixels in decoded]).float().div_(255).sub_(mean).div_(std)
        torch.cuda.synchronize()
        return batch

    run()
    benchmark(run)
    if benchmark.stats:
        benchmark.extra_info["samples/s"] = round(len(images) / benchmark.stats.stats.median, 1)
        benchmark.extra_info["card"] = torch.cuda.get_device_name()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-enable", *sys.argv[1:]]))

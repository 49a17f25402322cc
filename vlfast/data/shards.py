"""Pretraining pairs from webdataset tar shards, as img2dataset writes them (key.jpg, key.txt,
key.json per sample): local files, brace patterns, or `pipe:` commands for object storage.

    python -m vlfast.data.shards write --json pretrain.json --image-root images/ --out shards/ --samples 10000

Why webdataset's streaming pieces (gopen, its tar iteration and grouping by key) and not wids:
wids reads shards by index, so they must be local files (it downloads remote ones first) and a
`pipe:` stream cannot be read that way; a stream can. What exact resume and the split across
processes need, this module does itself, because webdataset's own splitters and resampling do
not give a position to resume from:

- **The split.** Each epoch's shard order is a permutation drawn from the run's seed and the
  epoch. The ranks × workers streams take every (ranks × workers)-th shard of it: every shard
  once an epoch, the streams' counts differing by one at most.
- **The order.** Each stream reads its shards in turn, each through a shuffle buffer seeded by
  (seed, epoch, stream, shard), and batches in the worker; the DataLoader then takes the workers'
  batches in turn. Every stream runs on into the next epoch, so the steps never run dry.
- **The position.** Each batch carries its stream's position after its last sample (epoch,
  shard, samples emitted from that shard). A checkpoint keeps the position of each stream's
  last batch the trainer consumed; a resumed stream skips the shards before it unread and
  replays the one it stopped in (one shard read at most) to the same sample, and the loader's
  workers are rotated so the first batch after the resume comes from the stream that was next.
  Augmentation draws are seeded per sample (seed, epoch, key), so the batches are the same.
- **Bad data** (an unreadable or truncated image, no caption, a caption that is not text, a tar
  cut short) is skipped; each skip's shard, key and reason travels with the batch to the
  trainer, which logs it. A shard that cannot be opened stops the run, naming it.
"""
import argparse
import hashlib
import io
import json
import os
import random
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import braceexpand
import torch
from PIL import Image
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000  # samples (encoded bytes) a stream shuffles within: about 50 MB of COCO-like JPEGs


class Position(NamedTuple):
    """Where a stream stands: ``samples`` emitted from the ``shard``-th shard of its ``epoch``."""
    epoch: int = 0
    shard: int = 0
    samples: int = 0


class BatchInfo(NamedTuple):
    """What a batch carries besides its tensors: the samples skipped to make it (their count and, for
    shards, each one's {"shard", "key", "reason"}), and the stream's position after it."""
    skipped: int = 0
    skips: Tuple[dict, ...] = ()
    stream: Optional[int] = None
    position: Optional[Position] = None


def expand(patterns: Sequence[str]) -> List[str]:
    """Shard URLs of brace patterns (a{000..099}.tar), local paths or pipe: commands, in order;
    a local file that is missing is a ValueError naming it (a command is only run when read)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls = [url for pattern in patterns for url in braceexpand.braceexpand(pattern)]
    if not urls:
        raise ValueError("data.shards names no shard")
    # webdataset's gopen reads these schemes itself (object storage: a pipe: command, e.g. aws s3 cp ... -)
    missing = [url for url in urls if not url.startswith(("pipe:", "http:", "https:", "gs:", "ais:", "hf:"))
               and not Path(url.removeprefix("file:")).is_file()]
    if missing:
        raise ValueError(f"data.shards: {len(missing)} of {len(urls)} shards are not files, e.g. {missing[0]} "
                         f"(from {', '.join(patterns)}; for s3: use pipe:aws s3 cp s3://... -)")
    return urls


@dataclass
class ShardPlan:
    """Which shards a stream reads in an epoch. ``sources``: each source's shard URLs; ``weights``:
    each source's share of an epoch's shard visits (None: every shard once per epoch); ``resample``:
    shards drawn with replacement, so any number of streams can read any number of shards."""
    sources: List[List[str]]
    seed: int
    weights: Optional[List[float]] = None
    resample: bool = False

    @property
    def shards(self) -> int:
        return sum(len(source) for source in self.sources)

    def check(self, streams: int) -> None:
        """Every stream must get a shard each epoch: ranks × workers ≤ an epoch's shard visits,
        unless resampling."""
        if self.weights is not None and (len(self.weights) != len(self.sources) or min(self.weights) <= 0):
            raise ValueError(f"data.shard_weights needs one weight > 0 per source ({len(self.sources)}), got {self.weights}")
        visits = len(self.epoch_order(0))
        if not self.resample and visits < streams:
            raise ValueError(f"{visits} shard visits an epoch for {streams} streams (processes × data.num_workers): "
                             f"every stream needs a shard each epoch; use fewer workers or data.resample_shards=true")

    def epoch_order(self, epoch: int) -> List[str]:
        """The epoch's shard visits, in a permutation drawn from (seed, epoch)."""
        rng = random.Random(f"{self.seed}/{epoch}")
        if self.weights is None:
            order = [url for source in self.sources for url in source]
            if self.resample:
                return rng.choices(order, k=len(order))
            rng.shuffle(order)
            return order
        # Each source's share of the visits, as close as whole shards allow, drawn from its shards
        total = sum(self.weights)
        visits = [max(1, round(self.shards * weight / total)) for weight in self.weights]
        order = [url for source, count in zip(self.sources, visits) for url in
                 (rng.choices(source, k=count) if self.resample or count > len(source) else rng.sample(source, count))]
        rng.shuffle(order)
        return order

    def stream_shards(self, epoch: int, stream: int, streams: int) -> List[str]:
        """The shards stream ``stream`` of ``streams`` reads in ``epoch``: every streams-th of the
        epoch's order from its own place, so every shard is read and the streams' counts differ
        by one at most."""
        order = self.epoch_order(epoch)
        if self.resample and len(order) < streams:  # few shards, many streams: one visit each
            return [random.Random(f"{self.seed}/{epoch}/{stream}").choice(order)]
        return order[stream::streams]


def stable_id(key: str) -> int:
    """A sample's image id from its key (63 bits of its SHA-1): the same key, the same id."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little") >> 1


def decode(sample: dict, transform: Callable) -> Tuple[Optional[dict], Optional[str]]:
    """(item {"image", "caption", "image_id"}, None) or (None, why it is skipped)."""
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image is None:
        return None, f"no image ({'/'.join(IMAGE_EXTENSIONS)})"
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption is not UTF-8 text"
    elif "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            return None, "json is not an object"
        if caption is None:
            return None, "no caption (no .txt, no \"caption\" in .json)"
        if not isinstance(caption, str):
            return None, f"caption is not text: {type(caption).__name__}"
    else:
        return None, "no caption (no .txt, no .json)"
    if not caption.strip():
        return None, "empty caption"
    try:
        with Image.open(io.BytesIO(image)) as pil:
            pixels = transform(pil.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's for bad or cut images
        return None, f"unreadable image ({type(error).__name__})"
    return {"image": pixels, "caption": caption.strip(), "image_id": stable_id(sample["__key__"])}, None


def shard_samples(url: str, skips: List[dict]) -> Iterator[dict]:
    """The samples of one shard, grouped by key (encoded bytes). An archive cut short ends the
    shard: the samples before the cut are kept and the cut recorded as a skip; a key given twice
    is recorded and its second file dropped. Anything else (a shard that cannot be opened or is
    not a tar archive, a read error of the storage, a failing pipe: command) raises, naming it."""
    try:
        stream = gopen(url)
    except Exception as error:  # noqa: BLE001  (missing file, failing command: named)
        raise RuntimeError(f"shard {url} cannot be opened: {error}") from None
    members = [0]

    def bad_data(error) -> bool:
        """Skips what is bad data; raises what is not."""
        if isinstance(error, ValueError) and "duplicate file name" in str(error):
            skips.append({"shard": url, "key": None, "reason": f"duplicate file name ({error})"[:200]})
            return True
        if isinstance(error, (tarfile.ReadError, EOFError)) and members[0]:
            skips.append({"shard": url, "key": None, "reason": f"tar cut short ({type(error).__name__}: {error})"[:200]})
            return False  # stop reading this shard
        raise RuntimeError(f"shard {url}: reading it failed: {type(error).__name__}: {error}") from None

    def counted(files):
        for member in files:
            members[0] += 1
            yield {**member, "__url__": url}

    try:
        try:
            yield from group_by_keys(counted(tar_file_iterator(stream, handler=bad_data)), handler=bad_data)
        except RuntimeError:
            raise
        except Exception as error:  # noqa: BLE001  (tarfile raises from its own iteration on a cut archive)
            bad_data(error)
    finally:
        try:
            stream.close()
        except Exception as error:  # noqa: BLE001  (a pipe: command's failure shows at close)
            raise RuntimeError(f"shard {url}: reading it failed: {error}") from None


def shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer of ``size`` samples, flushed in random order at the end."""
    buffer = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of a rank's streams (one per DataLoader worker), endless: (images, input_ids,
    attention_mask, image_ids, BatchInfo), the tensors from ``collate(items)``.

    ``start``: each stream's Position to resume from (a checkpoint's); ``first_worker``: the stream
    the loader's worker 0 plays, so that after a resume the loader's first batch comes from the
    stream whose turn it was (start step % workers)."""

    def __init__(self, plan: ShardPlan, transform: Callable, collate: Callable, batch_size: int, rank: int = 0,
                 world: int = 1, start: Optional[Dict[int, Position]] = None, first_worker: int = 0,
                 shuffle_buffer: int = SHUFFLE_BUFFER):
        super().__init__()
        self.plan, self.transform, self.collate, self.batch_size = plan, transform, collate, batch_size
        self.rank, self.world, self.start, self.first_worker = rank, world, dict(start or {}), first_worker
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = 1 if info is None else info.num_workers
        worker = (0 if info is None else info.id) + self.first_worker
        stream = self.rank * workers + worker % workers
        yield from self.batches(stream, self.world * workers, self.start.get(stream, Position()))

    def batches(self, stream: int, streams: int, position: Position) -> Iterator[Tuple[tuple, BatchInfo]]:
        items, skips = [], []
        epoch, first, skip = position
        while True:
            shards = self.plan.stream_shards(epoch, stream, streams)
            if not shards:
                raise RuntimeError(f"stream {stream} of {streams} has no shard in epoch {epoch} (ShardPlan.check)")
            produced = 0
            for ordinal in range(first, len(shards)):
                url = shards[ordinal]
                rng = random.Random(f"{self.plan.seed}/{epoch}/{stream}/{ordinal}/{url}")
                replayed = len(skips)
                for emitted, sample in enumerate(shuffled(shard_samples(url, skips), self.shuffle_buffer, rng), 1):
                    if emitted <= skip:  # replaying the shard a resumed stream stopped in: its skips were reported
                        del skips[replayed:]
                        continue
                    with torch.random.fork_rng(devices=[]):  # its augmentation's draws, from its key alone
                        # (the CPU generator alone: torch.manual_seed also queues a seed for every
                        # accelerator type, with a stack trace each, 15% of a sample's time)
                        torch.default_generator.manual_seed(stable_id(f"{self.plan.seed}/{epoch}/{sample['__key__']}"))
                        item, why = decode(sample, self.transform)
                    if item is None:
                        skips.append({"shard": url, "key": sample["__key__"], "reason": why})
                    else:
                        items.append(item)
                        produced += 1
                    if len(items) == self.batch_size:
                        tensors = self.collate(items)[:4]  # (images, input_ids, attention_mask, image_ids)
                        yield (*tensors, BatchInfo(len(skips), tuple(skips), stream, Position(epoch, ordinal, emitted)))
                        items, skips = [], []
                skip = 0
            if not produced and first == 0:  # a whole epoch of this stream's shards gave nothing
                raise RuntimeError(f"stream {stream}'s shards of epoch {epoch} hold no sample ({', '.join(shards[:3])}"
                                   f"{', ...' if len(shards) > 3 else ''}; skipped: {skips[:3]})")
            epoch, first = epoch + 1, 0


def make_plan(patterns: Sequence[Sequence[str]], seed: int, weights: Optional[Sequence[float]] = None,
              resample: bool = False) -> ShardPlan:
    """A ShardPlan of one source per entry of ``patterns`` (each a pattern or a list of them)."""
    sources = [expand([source] if isinstance(source, str) else source) for source in patterns]
    return ShardPlan(sources, seed, None if weights is None else [float(w) for w in weights], resample)


# ---- python -m vlfast.data.shards write: an ALBEF-format JSON + image root into shards ----

def write_shards(annotation_files: Sequence[str], image_root: str, out: Path, samples_per_shard: int = 10000,
                 progress: bool = True) -> dict:
    """Every entry of ALBEF-format JSON files ({"image", "caption": str or [str]}) as shard samples
    (key.<image's extension> with the file's bytes, key.txt with the first caption, key.json with
    every caption and the source path), ``samples_per_shard`` per shard, out/{000000..}.tar;
    unreadable images skipped and counted. Returns {"shards", "samples", "skipped": [paths]}."""
    from tqdm import tqdm
    from webdataset import ShardWriter

    from vlfast.data.karpathy import load_annotations

    if samples_per_shard < 1:
        raise ValueError(f"--samples must be at least 1, got {samples_per_shard}")
    entries = [entry for file in annotation_files for entry in load_annotations(file, "pretrain")]
    out.mkdir(parents=True, exist_ok=True)
    root, skipped, written = Path(image_root or ""), [], 0
    with ShardWriter(str(out / "%06d.tar"), maxcount=samples_per_shard, verbose=0, encoder=False) as writer:
        for index, entry in enumerate(tqdm(entries, desc="samples", unit="sample", disable=not progress)):
            path = root / entry["image"]
            extension = path.suffix.lower().lstrip(".")
            try:
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    image.verify()
            except OSError:
                skipped.append(str(path))
                continue
            if extension not in IMAGE_EXTENSIONS:  # another format: stored as PNG
                with Image.open(io.BytesIO(data)) as image:
                    buffer = io.BytesIO()
                    image.convert("RGB").save(buffer, format="PNG")
                data, extension = buffer.getvalue(), "png"
            captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            record = {"caption": captions[0], "captions": captions, "image": entry["image"]}
            writer.write({"__key__": f"{index:09d}", extension: data, "txt": captions[0].encode(),
                          "json": json.dumps(record).encode()})
            written += 1
        shards = writer.shard
    return {"shards": shards, "samples": written, "skipped": skipped}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlfast.data.shards", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="ALBEF-format JSON files + an image root -> tar shards")
    write.add_argument("--json", nargs="+", required=True, help="ALBEF-format annotation files")
    write.add_argument("--image-root", default="", help="the folder the JSON image paths are relative to")
    write.add_argument("--out", type=Path, required=True, help="the folder the shards go to (000000.tar, ...)")
    write.add_argument("--samples", type=int, default=10000, help="samples per shard (img2dataset's default: 10000)")
    args = parser.parse_args(argv)
    try:
        result = write_shards(args.json, args.image_root, args.out, args.samples)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"python -m vlfast.data.shards write: {error}")
    print(f"wrote {result['samples']} samples in {result['shards']} shards to {args.out}; "
          f"{len(result['skipped'])} unreadable images skipped" + (f", e.g. {result['skipped'][0]}" if result["skipped"] else ""))
    print(f"train from them with: data.dataset=shards data.shards={os.path.join(args.out, '{000000..%06d}.tar' % (result['shards'] - 1))}")


if __name__ == "__main__":
    main()

"""retrieve.py and vlfast.retrieval: the two-stage scorer against brute force, one process against
two, and the command line (evaluation outputs, search with its cache, fine-tuning, bad input)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from helpers import DEVICES, ROOT, TINY, batch, tiny
from vlfast.data.synthetic import SyntheticImageText, render
from vlfast.retrieval import Embeddings, pair_share, two_stage_scores, two_stage_scores_reference

TINY_EVAL = [*TINY, "data.images=16", "data.captions_per_image=2", "data.eval_images=6", "optim.max_steps=2",
             "retrieval.batch_size=4"]


def embeddings(images=5, texts=7):
    torch.manual_seed(1)
    model = tiny().eval()
    pixels, input_ids, mask = batch(max(images, texts))
    with torch.no_grad():
        image, image_feat = model.embed_image(pixels[:images])
        text, text_feat = model.embed_text(input_ids[:texts], mask[:texts])
    return model, Embeddings(image, image_feat, text, mask[:texts], text_feat)


def brute_force_itm(model, emb):
    """The ITM match logit of every (image, text) pair, one pair at a time, at full padded length."""
    with torch.no_grad():
        return torch.tensor([[float(model.itm_logits(emb.image[i:i + 1], emb.text[t:t + 1], emb.text_mask[t:t + 1])[0, 1])
                              for t in range(len(emb.text))] for i in range(len(emb.image))])


def test_top_k_of_everything_equals_itm_on_every_pair():
    model, emb = embeddings()
    want = brute_force_itm(model, emb)
    sims = emb.image_feat @ emb.text_feat.T
    i2t, t2i = two_stage_scores(model, emb, k=100, score="itm", pair_batch_size=3)  # k beyond the set: clipped
    torch.testing.assert_close(i2t, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t2i, want.T, rtol=1e-4, atol=1e-5)
    i2t, t2i = two_stage_scores(model, emb, k=100, score="itm+itc")
    torch.testing.assert_close(i2t, want + sims, rtol=1e-4, atol=1e-5)
    i2t, t2i = two_stage_scores(model, emb, k=100, score="itc")
    torch.testing.assert_close(i2t, sims)
    torch.testing.assert_close(t2i, sims.T)


def test_top_k_rescored_and_the_rest_in_similarity_order_below():
    model, emb = embeddings()
    want, sims = brute_force_itm(model, emb), emb.image_feat @ emb.text_feat.T
    i2t, t2i = two_stage_scores(model, emb, k=2)
    for scores, full, similarity in ((i2t, want, sims), (t2i, want.T, sims.T)):
        top = similarity.topk(2, dim=1).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, True)
        torch.testing.assert_close(scores[chosen], full[chosen], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores[~chosen], similarity[~chosen] - 100)  # below any ITM logit


def albef_evaluation(model, emb, k, score):
    """ALBEF's evaluation() (Retrieval.py, BLIP's train_retrieval.py alike), written out: for each
    image its top-k texts through the fusion encoder on the image's tokens repeated k times, for
    each text its top-k images gathered, the ITM match logit (plus the similarity for BLIP's
    "itm+itc") into a matrix of -100."""
    sims = emb.image_feat @ emb.text_feat.T
    score_i2t = torch.full(sims.shape, -100.0, device=sims.device)
    score_t2i = torch.full(sims.T.shape, -100.0, device=sims.device)
    with torch.no_grad():
        for i, row in enumerate(sims):
            topk_sim, topk_idx = row.topk(min(k, len(row)))
            encoder_output = emb.image[i].repeat(len(topk_idx), 1, 1)
            logits = model.itm_logits(encoder_output, emb.text[topk_idx], emb.text_mask[topk_idx])
            score_i2t[i, topk_idx] = logits[:, 1] + (topk_sim if score == "itm+itc" else 0)
        for t, row in enumerate(sims.T):
            topk_sim, topk_idx = row.topk(min(k, len(row)))
            encoder_output = emb.image[topk_idx]
            logits = model.itm_logits(encoder_output, emb.text[t].repeat(len(topk_idx), 1, 1),
                                      emb.text_mask[t].repeat(len(topk_idx), 1))
            score_t2i[t, topk_idx] = logits[:, 1] + (topk_sim if score == "itm+itc" else 0)
    return score_i2t, score_t2i


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score", ["itm", "itm+itc"])
def test_equals_albefs_per_query_loop(score, device):
    """The same top-k entries and, with k >= 10, the same recall: past the top k ALBEF's -100 and
    vlfast's similarity - 100 both rank below every ITM score, so R@1/5/10 cannot see them."""
    from vlfast.retrieval import itm_eval

    model, emb = embeddings(images=8, texts=16)
    model = model.to(device)
    emb = Embeddings(*(x.to(device) for x in (emb.image, emb.image_feat, emb.text, emb.text_mask, emb.text_feat)))
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):  # retrieval's own on a GPU
        want_i2t, want_t2i = albef_evaluation(model, emb, 10, score)
    got_i2t, got_t2i = two_stage_scores(model, emb, k=10, score=score, pair_batch_size=7)
    tolerance = dict(rtol=1e-4, atol=1e-5) if device == "cpu" else dict(rtol=2e-2, atol=2e-2)  # bf16 on a GPU
    for got, want, count in ((got_i2t, want_i2t, 8 * 10), (got_t2i, want_t2i, 16 * 8)):  # k clipped to 8 images
        scored = want != -100
        assert scored.sum() == count
        torch.testing.assert_close(got[scored], want[scored], **tolerance)
    reference = two_stage_scores_reference(model, emb, k=10, score=score)  # the benchmarks' ALBEF loop
    torch.testing.assert_close(reference, (want_i2t, want_t2i), **tolerance)
    if device == "cuda":
        return  # bf16 rounding may swap close scores: recall is compared in fp32
    txt2img, img2txt = [t // 2 for t in range(16)], [[2 * i, 2 * i + 1] for i in range(8)]
    assert itm_eval(got_i2t.cpu().numpy(), got_t2i.cpu().numpy(), txt2img, img2txt) == \
        itm_eval(want_i2t.cpu().numpy(), want_t2i.cpu().numpy(), txt2img, img2txt)


def test_a_small_cache_budget_takes_the_images_in_chunks_with_the_same_scores(monkeypatch):
    """retrieval.cache_gb bounds the images whose keys and values are held at once: one image's
    worth makes a chunk per image, with the scores of one chunk for all."""
    from vlfast import retrieval

    model, emb = embeddings()
    chunks = []
    fusion_cache = type(model).fusion_cache
    monkeypatch.setattr(type(model), "fusion_cache", lambda self, image: chunks.append(len(image)) or fusion_cache(self, image))
    want = two_stage_scores(model, emb, k=3)
    assert chunks[1:] == [5]  # (the first call measures one image's entry)
    per_image = fusion_cache(model, emb.image[:1]).nbytes()
    chunks.clear()
    got = two_stage_scores(model, emb, k=3, cache_gb=1.5 * per_image / 2**30)
    assert chunks[1:] == [1] * 5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cache_gb must be > 0"):
        retrieval.rerank_pairs(model, emb, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), cache_gb=0)


def test_scores_under_a_callers_autocast():
    """A caller's bf16 autocast (the benchmarks', a GPU script's) gave bf16 similarities, which
    the fp32 ITM scores could not be written into; the similarities stay fp32."""
    model, emb = embeddings()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for reranked in two_stage_scores(model, emb, k=3), two_stage_scores_reference(model, emb, k=3):
            assert [s.dtype for s in reranked] == [torch.float32] * 2


def test_bad_score_and_k():
    model, emb = embeddings()
    with pytest.raises(ValueError, match="score must be one of"):
        two_stage_scores(model, emb, k=2, score="itm+itm")
    with pytest.raises(ValueError, match="k must be at least 1"):
        two_stage_scores(model, emb, k=0)


@pytest.mark.parametrize("images, world", [([0, 0, 1, 2, 2, 2, 3], 4), ([0, 1, 1, 1, 1, 2], 2), ([5], 8),
                                           (list(range(41)), 8), ([], 3), ([0] * 9, 3)])
def test_pair_share_splits_every_pair_once_at_image_boundaries(images, world):
    image_idx = torch.tensor(images, dtype=torch.long)
    shares = [pair_share(image_idx, rank, world) for rank in range(world)]
    assert [i for start, end in shares for i in range(start, end)] == list(range(len(images)))
    for start, end in shares:  # no image's pairs on two ranks
        assert start == end or start == 0 or images[start] != images[start - 1]
    if len(set(images)) >= world:  # balanced to within one image's pairs
        assert max(end - start for start, end in shares) <= len(images) // world + max(map(images.count, images))


def _two_ranks(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, emb = embeddings()
    i2t, t2i = two_stage_scores(model, emb, k=3, score="itm+itc")
    torch.save({"i2t": i2t, "t2i": t2i}, f"{out}.{rank}")
    dist.barrier()  # no rank tears its connections down while the other still uses them
    dist.destroy_process_group()


def test_two_processes_give_the_scores_of_one(tmp_path):
    model, emb = embeddings()
    i2t, t2i = two_stage_scores(model, emb, k=3, score="itm+itc")
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), str(tmp_path / "scores")), nprocs=2)
    for rank in range(2):  # the merged pairs split between the ranks at an image, summed across ranks
        got = torch.load(f"{tmp_path / 'scores'}.{rank}", weights_only=True)
        torch.testing.assert_close(got["i2t"], i2t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["t2i"], t2i, rtol=1e-5, atol=1e-6)


def run(*args, processes=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *launcher, *args], cwd=ROOT, capture_output=True, text=True, env=environment)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run("train.py", "--out", str(out), *TINY_EVAL)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "last.pt"


@pytest.fixture
def checkpoint(trained_checkpoint, tmp_path):
    """The module's trained checkpoint, copied into this test's folder: what retrieve.py writes
    beside it (results, the search cache) is then this test's alone, whatever ran before."""
    copy = tmp_path / "trained" / "last.pt"
    copy.parent.mkdir()
    copy.write_bytes(trained_checkpoint.read_bytes())
    return copy


def test_evaluation_prints_the_table_and_writes_json_and_png(checkpoint):
    result = run("retrieve.py", "--checkpoint", str(checkpoint), "--k-test", "3", "data.eval_images=6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test: 6 images, 12 texts, score itm, k 3" in result.stdout
    assert "text retrieval" in result.stdout and "image retrieval" in result.stdout
    record = json.loads((checkpoint.parent / "last_retrieval_test.json").read_text())
    assert set(record["metrics"]) == {f"{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10, "_mean")} | {"r_mean"}
    assert len(record["image_to_text"]) == 6 and len(record["text_to_image"]) == 12
    first = record["image_to_text"][0]["top"]
    assert len(first) == 10 and all(a["score"] >= b["score"] for a, b in zip(first, first[1:]))
    assert [hit["correct"] for hit in first] == [hit["index"] in (0, 1) for hit in first]  # image 0 owns texts 0, 1
    # The JSON's top lists are the matrix the metrics came from: recompute R@1 from them.
    hits = np.mean([any(hit["correct"] for hit in row["top"][:1]) for row in record["image_to_text"]])
    assert record["metrics"]["txt_r1"] == pytest.approx(100 * hits)
    with Image.open(checkpoint.parent / "last_retrieval_test.png") as sheet:
        assert sheet.size[0] > 300 and sheet.size[1] > 300


def test_torchrun_evaluation_equals_one_process(checkpoint, tmp_path):
    metrics = {}
    for processes in (1, 2):
        result = run("retrieve.py", "--checkpoint", str(checkpoint), "--k-test", "4", "--score", "itm+itc", processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics[processes] = json.loads((checkpoint.parent / "last_retrieval_test.json").read_text())
    assert metrics[1]["metrics"] == metrics[2]["metrics"]
    assert metrics[1]["image_to_text"] == metrics[2]["image_to_text"]


def test_evaluation_errors_name_the_problem(tmp_path, checkpoint):
    result = run("retrieve.py", "--checkpoint", str(tmp_path / "missing.pt"))
    assert result.returncode == 2 and "missing.pt: no such file" in result.stderr
    result = run("retrieve.py", "--checkpoint", str(checkpoint), "retrieval.k_tset=3")
    assert result.returncode == 2 and "unknown config key retrieval.k_tset" in result.stderr
    result = run("retrieve.py", "--checkpoint", str(checkpoint), "data.dataset=karpathy")
    assert result.returncode == 2 and "needs data.test_file and data.image_root" in result.stderr
    result = run("retrieve.py", "--checkpoint", str(checkpoint), "retrieval.score=itm_itc")
    assert result.returncode == 2 and "retrieval.score (--score) must be one of" in result.stderr
    result = run("retrieve.py", "--checkpoint", str(checkpoint), "retrieval.k_test=0")
    assert result.returncode == 2 and "retrieval.k_test (--k-test) must be at least 1, got 0" in result.stderr
    result = run("retrieve.py", "--checkpoint", str(checkpoint), "retrieval.split=train")
    assert result.returncode == 2 and "retrieval.split (--split) must be val or test, got 'train'" in result.stderr
    result = run("retrieve.py", "--finetune", "--checkpoint", str(checkpoint), "retrieval.finetune_epochs=0")
    assert result.returncode == 2 and "retrieval.finetune_epochs must be at least 1" in result.stderr
    result = run("retrieve.py", "--finetune", "--checkpoint", str(checkpoint), "optim.batch_size=1000")
    assert result.returncode == 2 and "fewer than one global batch of optim.batch_size 1000" in result.stderr
    result = run("retrieve.py", "--finetune", "--checkpoint", str(checkpoint), "data.dataset=karpathy",
                 f"data.train_file={tmp_path / 'train.json'}", f"data.image_root={tmp_path}")
    assert result.returncode == 2 and "train.json" in result.stderr and "Traceback" not in result.stderr


def save_renders(folder, count, image_size=32):
    """Synthetic test images as PNG files, with their first captions."""
    folder.mkdir(parents=True, exist_ok=True)
    data = SyntheticImageText("test", images=count, image_size=image_size)
    for index in range(count):
        pixels = render(data.scene(index), image_size, np.random.default_rng(index))
        Image.fromarray(pixels).save(folder / f"scene{index:02}.png")
    return [data.captions(index)[0] for index in range(count)]


def search(checkpoint, *args):
    return run("retrieve.py", "search", "--checkpoint", str(checkpoint), *args)


def test_search_a_folder_ranks_every_image_and_caches_the_embeddings(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    captions = save_renders(folder, 5)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_text("a truncated download")
    result = search(checkpoint, "--images", str(folder), "--text", captions[0], "--top", "10", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedding 6 of 6 images" in result.stderr and "skipped: " in result.stderr and "broken.jpg" in result.stderr
    matches = json.loads(result.stdout)
    assert sorted(Path(m["path"]).name for m in matches) == [f"scene{i:02}.png" for i in range(5)]
    assert all(a["itc"] >= b["itc"] for a, b in zip(matches, matches[1:]))
    assert list((checkpoint.parent / "search_cache").glob("*.pt"))

    again = search(checkpoint, "--images", str(folder), "--text", captions[0], "--top", "10", "--json")
    assert "embedding" not in again.stderr and json.loads(again.stdout) == matches
    cache_file, = (checkpoint.parent / "search_cache").glob("*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # cut short, as by a crash: rebuilt
    rebuilt = search(checkpoint, "--images", str(folder), "--text", captions[0], "--top", "10", "--json")
    assert "ignoring the unreadable cache" in rebuilt.stderr and "embedding 6 of 6 images" in rebuilt.stderr
    assert json.loads(rebuilt.stdout) == matches

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "scene03.png")  # changed: re-embedded alone
    os.utime(folder / "scene03.png", ns=(1, 1))
    (folder / "scene04.png").unlink()
    changed = search(checkpoint, "--images", str(folder), "--text", captions[0], "--top", "10", "--json")
    assert "embedding 1 of 5 images" in changed.stderr
    assert len(json.loads(changed.stdout)) == 4


def test_search_rerank_and_the_other_direction(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    captions = save_renders(folder, 4)
    result = search(checkpoint, "--images", str(folder), "--text", captions[1], "--rerank", "2", "--top", "4", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    matches = json.loads(result.stdout)
    assert [("itm" in m) for m in matches] == [True, True, False, False]
    assert matches[0]["itm"] >= matches[1]["itm"]
    table = search(checkpoint, "--images", str(folder), "--text", captions[1])
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 4 and "scene" in table.stdout

    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n\n")
    reverse = search(checkpoint, "--image", str(folder / "scene02.png"), "--captions", str(tmp_path / "captions.txt"),
                     "--top", "3", "--rerank", "3", "--json")
    assert reverse.returncode == 0, reverse.stderr[-3000:]
    found = json.loads(reverse.stdout)
    assert len(found) == 3 and {m["caption"] for m in found} <= set(captions) and all("itm" in m for m in found)


@pytest.mark.parametrize("args, message", [
    (["--images", "{tmp}/nowhere", "--text", "a red circle"], "nowhere: not a folder"),
    (["--images", "{tmp}/empty", "--text", "a red circle"], "empty: no images"),
    (["--images", "{tmp}/empty"], "one of the arguments --text --image is required"),
    (["--text", "a red circle"], "give --images DIR"),
    (["--image", "{tmp}/none.png", "--captions", "{tmp}/c.txt"], "none.png: no such file"),
    (["--image", "{tmp}/broken.png", "--captions", "{tmp}/blank.txt"], "blank.txt: no captions in it"),
    (["--image", "{tmp}/broken.png", "--captions", "{tmp}/c.txt"], "broken.png: not a readable image"),
])
def test_search_errors_name_the_bad_argument(checkpoint, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_text("not a png")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "c.txt").write_text("a red circle\n")
    result = search(checkpoint, *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_finetune_keeps_the_best_epoch_by_val_recall(checkpoint, tmp_path):
    out = tmp_path / "ft"
    result = run("retrieve.py", "--finetune", "--checkpoint", str(checkpoint), "--out", str(out), "--k-test", "3",
                 "retrieval.finetune_epochs=2", "retrieval.finetune_lr=1e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("val: 6 images, 12 texts") == 2 and "test: 6 images" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = [r["eval_score"] for r in records if "eval_score" in r]
    best = torch.load(out / "best.pt", weights_only=True)
    assert len(scores) == 2 and best["best_score"] == max(scores)
    assert best["step"] == 8 * (1 + scores.index(max(scores)))  # an epoch: 16 images × 2 captions / batch 4
    assert tuple(best["config"]["model"]["objectives"]) == ("itc", "itm") and best["config"]["image_id_positives"]
    assert (out / "best_retrieval_test.json").exists()
    resumed = run("train.py", "--resume", str(out / "best.pt"), "--out", str(tmp_path / "again"))
    assert resumed.returncode != 0 and f"init.checkpoint={out / 'best.pt'}" in resumed.stderr
    losses = [r for r in records if "loss" in r]
    assert losses and set(k for r in losses for k in r if k.startswith("loss_")) == {"loss_itc", "loss_itm"}


def test_evaluation_on_a_karpathy_test_json(checkpoint, tmp_path):
    captions = save_renders(tmp_path / "images", 4)
    entries = [{"image": f"scene{i:02}.png", "caption": [captions[i], captions[i].upper()]} for i in range(4)]
    entries.insert(0, {"image": "lost.png", "caption": ["gone"]})  # served by the next entry, and said so
    (tmp_path / "test.json").write_text(json.dumps(entries))
    result = run("retrieve.py", "--checkpoint", str(checkpoint), "data.dataset=karpathy",
                 f"data.test_file={tmp_path / 'test.json'}", f"data.image_root={tmp_path / 'images'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test: 5 images, 10 texts" in result.stdout
    assert "warning: 1 unreadable images in the test split" in result.stdout
    record = json.loads((checkpoint.parent / "last_retrieval_test.json").read_text())
    assert record["skipped_images"] == 1 and record["text_to_image"][5]["caption"] == captions[1].upper()

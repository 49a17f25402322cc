import numpy as np
import pytest

from vlfast.retrieval import itm_eval


def test_recalls_on_a_hand_checked_example():
    # 3 images, 2 captions each (image i owns captions 2i, 2i+1).
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    i2t = np.array([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # best caption 1 is its own: rank 0
        [0.9, 0.0, 0.1, 0.0, 0.0, 0.0],  # own captions 2, 3 rank 1 and >1: best rank 1
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all ties: stable order puts captions 4, 5 at ranks 4, 5
    ])
    t2i = np.zeros((6, 3))
    t2i[:, 0] = 1.0  # every caption ranks image 0 first: right for captions 0, 1 only
    metrics = itm_eval(i2t, t2i, txt2img, img2txt)
    assert metrics["txt_r1"] == pytest.approx(100 / 3) and metrics["txt_r5"] == pytest.approx(100.0)
    assert metrics["txt_r10"] == 100.0
    assert metrics["img_r1"] == pytest.approx(100 / 3) and metrics["img_r5"] == 100.0
    assert metrics["txt_r_mean"] == pytest.approx((100 / 3 + 100 + 100) / 3)
    assert metrics["r_mean"] == pytest.approx((metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2)


def test_perfect_and_chance_scores():
    rng = np.random.default_rng(0)
    images, per = 200, 5
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(images)]
    txt2img = [t // per for t in range(images * per)]
    perfect = np.zeros((images, images * per))
    for i, captions in enumerate(img2txt):
        perfect[i, captions] = 1
    assert itm_eval(perfect, perfect.T, txt2img, img2txt)["r_mean"] == 100.0
    noise = rng.random((images, images * per))
    chance = itm_eval(noise, noise.T, txt2img, img2txt)
    assert chance["img_r1"] < 3 and chance["img_r10"] < 10  # chance: 0.5% and 5%


def test_shape_errors():
    with pytest.raises(ValueError, match="must be transposes in shape"):
        itm_eval(np.zeros((2, 3)), np.zeros((2, 3)), [0, 1, 1], [[0], [1]])
    with pytest.raises(ValueError, match="img2txt has 1 images"):
        itm_eval(np.zeros((2, 3)), np.zeros((3, 2)), [0, 1, 1], [[0]])


def test_albefs_argument_order_and_dicts():
    """ALBEF's call, itm_eval(scores_i2t, scores_t2i, txt2img, img2txt) with its datasets' dicts,
    gives what the lists give; the lists in the other order are refused, even when the counts
    of images and texts are equal and the lengths cannot tell them apart."""
    rng = np.random.default_rng(1)
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    i2t = rng.random((3, 6))
    lists = itm_eval(i2t, i2t.T, txt2img, img2txt)
    assert itm_eval(i2t, i2t.T, txt2img=txt2img, img2txt=img2txt) == lists
    assert itm_eval(i2t, i2t.T, dict(enumerate(txt2img)), dict(enumerate(img2txt))) == lists
    with pytest.raises(TypeError, match="other way round"):
        itm_eval(i2t, i2t.T, img2txt, txt2img)
    square = rng.random((2, 2))  # 2 images, 2 captions: only the kinds of the two tell them apart
    with pytest.raises(TypeError, match="other way round"):
        itm_eval(square, square.T, [[0], [1]], [0, 1])
    with pytest.raises(ValueError, match="keyed 0..2"):
        itm_eval(i2t, i2t.T, txt2img, {1: [0, 1], 2: [2, 3], 3: [4, 5]})

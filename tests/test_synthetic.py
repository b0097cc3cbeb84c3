"""Synthetic captioned scenes: determinism, split, captions, layout and speed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tessera.lab import synthetic as S


def test_same_seed_and_index_give_the_same_sample():
    a, b = S.make_sample(3, 17), S.make_sample(3, 17)
    assert np.array_equal(a.image, b.image)
    assert (a.caption, a.attributes) == (b.caption, b.attributes)
    others = [S.make_sample(3, i) for i in range(18, 24)] + [S.make_sample(4, 17)]
    assert any(o.caption != a.caption for o in others)


def test_batch_is_training_tensor_in_minus_one_to_one():
    batch = S.make_batch(8, seed=0, step=2)
    assert batch.images.shape == (8, 3, 64, 64) and batch.images.dtype == torch.float32
    assert batch.images.min() >= -1.0 and batch.images.max() <= 1.0
    assert len(batch.captions) == len(batch.attributes) == 8
    # batch `step` holds samples step*B … step*B+B-1 of the same stream
    third = S.make_sample(0, 2 * 8 + 3)
    assert batch.captions[3] == third.caption
    expected = torch.from_numpy(third.image).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(batch.images[3], expected)
    stream = S.batches(8, seed=0, start_step=2)
    assert next(stream).captions == batch.captions


def test_every_kind_is_generated():
    kinds = {S.make_sample(1, i).attributes["kind"] for i in range(60)}
    assert kinds == set(S.KINDS)


@pytest.mark.parametrize("kind", S.KINDS)
def test_heldout_combinations_never_appear_in_training(kind):
    rng = random.Random(0)
    train = {tuple(sorted(S.sample_attributes(rng, kind, "train").items())) for _ in range(400)}
    heldout = {tuple(sorted(S.sample_attributes(rng, kind, "heldout").items())) for _ in range(100)}
    assert train.isdisjoint(heldout)
    assert all(S.split_of(dict(h)) == "heldout" for h in heldout)
    share = np.mean([S.split_of(S.random_attributes(rng, kind)) == "heldout" for _ in range(2000)])
    assert 0.05 < share < 0.15


def test_split_is_fixed_by_the_combination_not_the_draw():
    attrs = {"kind": "shape", "shape": "circle", "color": "red", "position": "top left", "background": "blue"}
    assert S.split_of(attrs) == S.split_of(dict(reversed(list(attrs.items()))))
    heldout_sample = S.make_sample(5, 0, split="heldout")
    assert S.split_of(heldout_sample.attributes) == "heldout"


def test_captions_state_every_attribute():
    for i in range(300):
        s = S.make_sample(2, i)
        a, text = s.attributes, s.caption
        assert a["color"] in text
        if a["kind"] == "shape":
            assert a["shape"] in text and a["background"] in text
            assert a["position"].split()[-1] in text
        elif a["kind"] == "relation":
            assert a["shape"] in text and a["other_shape"] in text and a["other_color"] in text
            assert a["relation"].split()[0] in text
            # the first-named object is the subject of the relation
            assert text.index(a["shape"]) < text.index(a["other_shape"], text.index(a["relation"].split()[0]))
        elif a["kind"] == "word":
            assert f'"{a["word"]}"' in text and a["background"] in text
        else:
            assert a["other_color"] in text
            assert {"stripes": "stripes", "checks": "check", "gradient": "gradient"}[a["texture"]] in text
        assert " a orange" not in text and not text.startswith("a orange")


def test_canonical_caption_is_the_first_template():
    attrs = {"kind": "relation", "shape": "circle", "color": "red", "relation": "above", "other_shape": "square",
             "other_color": "blue", "background": "white"}  # fmt: skip
    assert S.caption(attrs) == "a red circle above a blue square on a white background"
    word = {"kind": "word", "word": "cat", "color": "yellow", "background": "black"}
    assert S.caption(word) == 'the word "cat" in yellow on a black background'
    assert S.caption({"kind": "shape", "shape": "star", "color": "orange", "position": "top left",
                      "background": "blue"}) == "an orange star at the top left on a blue background"  # fmt: skip


def test_shapes_and_words_stay_inside_the_frame():
    for i in range(200):
        s = S.make_sample(9, i, kinds=("shape", "relation", "word"))
        frame = np.concatenate([s.image[0], s.image[-1], s.image[:, 0], s.image[:, -1]])
        assert (frame == S.COLORS[s.attributes["background"]]).all(), s.caption
    assert max(S.word_alpha(w).shape[1] for w in S.WORDS) <= 60


def test_render_moves_things_only_within_the_caption():
    attrs = {
        "kind": "shape",
        "shape": "square",
        "color": "red",
        "position": "bottom right",
        "background": "black",
    }
    a, b = S.render(attrs, 0), S.render(attrs, 1)
    assert not np.array_equal(a, b)
    for img in (a, b):
        ys, xs = np.nonzero((img == S.COLORS["red"]).all(-1))
        assert ys.mean() > 64 * 2 / 3 and xs.mean() > 64 * 2 / 3


def test_texture_colours_are_exact():
    attrs = {"kind": "texture", "texture": "checks", "color": "green", "other_color": "white"}
    img = S.render(attrs, 0)
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert colours == {S.COLORS["green"], S.COLORS["white"]}
    grad = S.render({"kind": "texture", "texture": "gradient", "color": "black", "other_color": "white",
                     "orientation": "vertical"}, 0)  # fmt: skip
    assert tuple(grad[0, 0]) == S.COLORS["black"] and tuple(grad[-1, 0]) == S.COLORS["white"]
    assert np.array_equal(grad[:, 0], grad[:, 40])


def test_unknown_kind_and_split_are_refused():
    with pytest.raises(ValueError, match="kind"):
        S.random_attributes(random.Random(0), "video")
    with pytest.raises(ValueError, match="split"):
        S.sample_attributes(random.Random(0), "shape", "test")


def test_attribute_labels_match_the_attributes():
    captions, labels = next(S.caption_batches(16, seed=4))
    assert len(captions) == 16 and set(labels) == set(S.ATTRIBUTE_CLASSES)
    s = S.make_sample(0, 0, kinds=("word",))
    out = S.attribute_labels([s.attributes])
    assert S.WORDS[out["word"][0]] == s.attributes["word"]
    assert out["shape"][0] == S.IGNORE_LABEL and out["relation"][0] == S.IGNORE_LABEL


def test_rendering_rasterises_each_shape_and_glyph_once():
    """What keeps rendering fast enough for training (~10k images/s on one core): shapes and
    glyphs are rasterised once per size and reused, so a batch seen again rasterises nothing."""
    first = S.make_batch(256, seed=1)
    misses = S.shape_alpha.cache_info().misses, S.word_alpha.cache_info().misses
    again = S.make_batch(256, seed=1)
    assert (S.shape_alpha.cache_info().misses, S.word_alpha.cache_info().misses) == misses
    assert S.shape_alpha.cache_info().hits > 0 and S.word_alpha.cache_info().hits > 0
    assert bool((first.images == again.images).all())

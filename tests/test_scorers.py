"""Scorers read renders the way the captions describe them, and refuse wrong images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tessera.lab import scorers as R
from tessera.lab import synthetic as S


def _degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Roughly what a small generator gives: a little blur, noise and compression."""
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)
    noisy = np.clip(blurred + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=75)
    return np.asarray(Image.open(buf))


@pytest.mark.parametrize("kind", S.KINDS)
def test_ground_truth_renders_pass_every_check(kind):
    results = [
        R.score(s.image, s.attributes) for s in (S.make_sample(21, i, kinds=(kind,)) for i in range(200))
    ]
    summary = R.aggregate(results)
    failing = {k: v for k, v in summary.items() if k != "n" and v < 0.98}
    assert not failing, summary


@pytest.mark.parametrize("kind", S.KINDS)
def test_degraded_renders_mostly_pass(kind):
    rng = np.random.default_rng(0)
    samples = [S.make_sample(22, i, kinds=(kind,)) for i in range(60)]
    summary = R.aggregate(R.score(_degrade(s.image, rng), s.attributes) for s in samples)
    assert summary["all"] >= 0.9, summary


def _changed(attrs: dict, key: str, options, avoid=()) -> dict:
    """The same scene with `key` set to another allowed value (colours kept distinct)."""
    taken = {attrs.get(k) for k in ("color", "other_color", "background") if k != key} | set(avoid)
    new = next(o for o in options if o != attrs[key] and o not in taken)
    return {**attrs, key: new}


def _wrong_render_fails(kind: str, key: str, options, check: str | None = None, n: int = 25):
    for i in range(n):
        truth = S.make_sample(31, i, kinds=(kind,)).attributes
        if key not in truth:
            continue
        wrong = _changed(truth, key, options)
        result = R.score(S.render(wrong, i), truth)
        assert result[check or key] is False, (S.caption(truth), S.caption(wrong))


def test_wrong_object_colour_is_refused():
    _wrong_render_fails("shape", "color", S.COLORS)
    _wrong_render_fails("relation", "color", S.COLORS)
    _wrong_render_fails("relation", "other_color", S.COLORS)
    _wrong_render_fails("word", "color", S.COLORS)


def test_a_wrong_colour_fails_only_the_colour():
    for i in range(20):
        truth = S.make_sample(33, i, kinds=("shape", "word")).attributes
        result = R.score(S.render(_changed(truth, "color", S.COLORS), i), truth)
        assert result.pop("color") is False and all(result.values()), S.caption(truth)


def test_wrong_background_is_refused():
    for kind in ("shape", "relation", "word"):
        _wrong_render_fails(kind, "background", S.COLORS)


def test_wrong_shape_position_relation_and_word_are_refused():
    _wrong_render_fails("shape", "shape", S.SHAPES)
    _wrong_render_fails("shape", "position", S.POSITIONS)
    _wrong_render_fails("relation", "shape", S.SHAPES)
    _wrong_render_fails("relation", "other_shape", S.SHAPES)
    _wrong_render_fails("relation", "relation", S.RELATIONS)
    _wrong_render_fails("word", "word", S.WORDS)


def test_wrong_texture_orientation_and_colours_are_refused():
    for i in range(30):
        truth = S.make_sample(32, i, kinds=("texture",)).attributes
        for texture in S.TEXTURES:
            if texture == truth["texture"]:
                continue
            wrong = {k: v for k, v in truth.items() if k != "orientation"} | {"texture": texture}
            if texture != "checks":
                wrong["orientation"] = truth.get("orientation", "vertical")
            assert R.score(S.render(wrong, i), truth)["texture"] is False, (
                S.caption(truth),
                S.caption(wrong),
            )
    _wrong_render_fails("texture", "orientation", S.ORIENTATIONS)
    _wrong_render_fails("texture", "color", S.COLORS, check="colors")


def test_reversed_gradient_fails_only_on_colours():
    attrs = {
        "kind": "texture",
        "texture": "gradient",
        "color": "red",
        "other_color": "blue",
        "orientation": "horizontal",
    }
    reversed_ = {**attrs, "color": "blue", "other_color": "red"}
    assert R.score(S.render(reversed_), attrs) == {"texture": True, "orientation": True, "colors": False}


def test_blank_image_passes_only_the_background():
    blank = np.full((64, 64, 3), S.COLORS["blue"], dtype=np.uint8)
    shape = {"kind": "shape", "shape": "circle", "color": "red", "position": "center", "background": "blue"}
    assert R.score(blank, shape) == {"background": True, "color": False, "shape": False, "position": False}
    word = {"kind": "word", "word": "cat", "color": "red", "background": "blue"}
    assert R.score(blank, word) == {"background": True, "color": False, "word": False}
    relation = {"kind": "relation", "shape": "circle", "color": "red", "relation": "above", "other_shape": "star",
                "other_color": "white", "background": "blue"}  # fmt: skip
    result = R.score(blank, relation)
    assert result.pop("background") and not any(result.values())
    stripes = {
        "kind": "texture",
        "texture": "stripes",
        "color": "blue",
        "other_color": "red",
        "orientation": "vertical",
    }
    assert not any(R.score(blank, stripes).values())


def test_every_image_convention_reads_the_same():
    s = S.make_sample(40, 0, kinds=("relation",))
    as_image01 = torch.from_numpy(s.image).float()[None] / 255.0  # IMAGE socket value [1, H, W, 3]
    as_training = torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1.0
    upscaled = s.pil().resize((256, 256), Image.NEAREST)
    expected = R.score(s.image, s.attributes)
    assert all(expected.values())
    for form in (s.pil(), as_image01, as_training, upscaled, s.image.astype(np.float32) / 255.0):
        assert R.score(form, s.attributes) == expected


def test_score_batch_takes_an_image_batch():
    samples = [S.make_sample(41, i) for i in range(4)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).float() / 255.0
    results = R.score_batch(images, [s.attributes for s in samples])
    assert len(results) == 4 and all(all(r.values()) for r in results)
    with pytest.raises(ValueError):
        R.score_batch(images, [samples[0].attributes])


def test_aggregate_counts_per_attribute_and_overall():
    summary = R.aggregate([{"color": True, "shape": False}, {"color": True, "shape": True}, {"word": False}])
    assert summary == {"color": 1.0, "shape": 0.5, "word": 0.0, "all": 1 / 3, "n": 3.0}
    assert R.aggregate([])["n"] == 0.0


def test_connected_components_separate_blobs():
    mask = np.zeros((10, 10), bool)
    mask[1:4, 1:4] = True
    mask[6:9, 2:9] = True
    mask[5, 8] = True  # touches the second blob
    labels = R.components(mask)
    assert len(np.unique(labels[labels >= 0])) == 2
    assert R.largest_component(mask).sum() == 22


def test_relation_uses_the_dominant_axis():
    assert R.relation_of((10, 30), (50, 35)) == "left of"
    assert R.relation_of((30, 50), (35, 10)) == "below"
    assert R.position_of(5, 60) == "bottom left" and R.position_of(32, 32) == "center"

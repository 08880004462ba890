"""``synthetic-split``: one text-only and one image-only keyphrase per post, and the shortcut."""

from __future__ import annotations

import pytest

from aimkp.data import load_dataset
from aimkp.data.corrupt import apply_setting
from aimkp.data.synthetic import SHAPE_TAGS, generate


def test_each_post_has_a_text_keyphrase_and_an_image_keyphrase() -> None:
    recs = load_dataset("synthetic-split:2", "train", n=30, image_size=32)
    for r in recs:
        topic, shape = r.keyphrases
        assert r.meta["kp_source"] == {topic: "text", shape: "image"}
        assert shape not in r.text.split()  # only the image tells the shape
        assert r.image is not None
    # the plain generator is unchanged: three keyphrases, the joint one last
    assert len(load_dataset("synthetic:2", "train", n=1, image_size=32)[0].keyphrases) == 3


def _tag_matches(recs) -> float:
    return sum(r.text.split()[-1] == SHAPE_TAGS[r.meta["shape"]] for r in recs) / len(recs)


def test_shortcut_holds_on_train_only() -> None:
    train = load_dataset("synthetic-split:0:1", "train", n=200, image_size=16)
    test = load_dataset("synthetic-split:0:1", "test", n=600, image_size=16)
    assert _tag_matches(train) == 1.0
    assert 0.08 < _tag_matches(test) < 0.3  # random tag: 1/6 of the posts by chance
    assert all(r.text.split()[-1] in SHAPE_TAGS.values() for r in test)
    assert not any(
        r.text.split()[-1] in SHAPE_TAGS.values()
        for r in load_dataset("synthetic-split:0", "test", n=50, image_size=16)
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic-split:x", "seed must be an integer"),
        ("synthetic-split:1:1.5", "shortcut P must be a number in"),
        ("synthetic-split:1:a", "shortcut P must be a number in"),
        ("synthetic-split:1:0.5:2", "expected synthetic-split"),
        ("synthetic:1:0.5", r"expected synthetic\[:SEED\]"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset(spec, "train", n=1)


def test_shortcut_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="shortcut"):
        generate(1, shortcut=2.0)


def test_hidden_settings_only_mark_the_records() -> None:
    recs = load_dataset("synthetic-split:1", "test", n=3, image_size=16)
    for name, kind in (("text_hidden", "text"), ("image_hidden", "image")):
        out = apply_setting(name, list(recs))
        assert [r.meta["hidden_modality"] for r in out] == [kind] * 3
        assert [r.meta["setting"] for r in out] == [name] * 3
        assert [(r.text, r.image) for r in out] == [(r.text, r.image) for r in recs]
        assert "hidden_modality" not in recs[0].meta  # inputs not mutated

"""conditioner/text: byte tokenizer, left padding, null prompt, caption dropout, templates; the class conditioner's
interface beside it."""

from __future__ import annotations

import pytest
import torch

from arlab.conditioner.label import ClassConditioner
from arlab.conditioner.text import BOI, NULL, PAD, TextConditioner
from arlab.data.shapes import CLASSES, TEST_START, class_from_caption, render
from arlab.errors import ConfigError


def text(max_bytes: int = 16, **kw) -> TextConditioner:
    return TextConditioner(TextConditioner.Config(max_bytes=max_bytes, **kw), dim=32)


def test_encode_is_left_padded_bytes_then_boi_and_decodes_back():
    t = text(8)
    ids = t.encode(["ab", "", "héllo"])
    assert ids.shape == (3, 9) and t.prefix_len == 9
    assert ids[0].tolist() == [PAD] * 6 + [97, 98, BOI]
    assert ids[1].tolist() == [PAD] * 8 + [BOI]
    assert t.decode(ids) == ["ab", "", "héllo"]


def test_null_prompt_differs_from_every_real_prompt():
    t = text(8)
    real = t.encode(["", "a", "x" * 8, "\x00"])
    null = t.null_like(real)
    assert (null == NULL).sum(1).tolist() == [1] * 4
    assert not bool((real == NULL).any())  # bytes are < 256: no caption can spell the null prompt
    for row in real:
        assert not torch.equal(row, null[0])
    prefix_null, _, _ = t(null[:1])
    prefix_empty, _, _ = t(real[:1])
    assert not torch.allclose(prefix_null, prefix_empty)
    assert t.decode(null[:1]) == ["<null>"]


def test_long_captions_are_cut_and_counted():
    t = text(4)
    ids = t.encode(["abcdefg", "ab"])
    assert ids[0].tolist() == [97, 98, 99, 100, BOI] and t.truncated == 1


def test_caption_dropout_replaces_whole_rows_by_the_null_prompt():
    t = text(8, dropout=0.5)
    ids = t.encode(["circle"] * 400)
    out = t.drop(ids, generator=torch.Generator().manual_seed(0))
    null = t.null_like(ids)
    dropped = (out == null).all(1)
    kept = (out == ids).all(1)
    assert bool((dropped | kept).all()) and 150 < int(dropped.sum()) < 250


def test_padding_mask_and_adaln_vector_ignore_padding():
    t = text(8)
    ids = t.encode(["ab", "abcd"])
    prefix, vec, valid = t(ids)
    assert prefix.shape == (2, 9, 32) and vec.shape == (2, 32)
    assert valid[0].tolist() == [False] * 6 + [True] * 3
    e = t.embedding(ids[0]) + t.pos
    assert torch.allclose(vec[0], e[6:].mean(0), atol=1e-6)


def test_captions_from_the_batch_or_the_class_template():
    t = text(32, template="a photo of a {}")
    batch = {"caption": ["a red ring", ""], "label": torch.tensor([6, 3]), "key": ["k0", "k1"]}
    ids = t.from_batch(batch, ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    assert t.decode(ids) == ["a red ring", "a photo of a cat"]
    with pytest.raises(ValueError, match=r"no caption \(sample k1\) and conditioner.template is empty"):
        text(32).from_batch(batch, ["x"] * 10)
    with pytest.raises(ConfigError, match="must contain"):
        TextConditioner.Config(template="a photo")


def test_check_rejects_malformed_conditions():
    t = text(8)
    with pytest.raises(ValueError, match=r"\(B, 9\) token ids"):
        t.check(torch.zeros(2, 5, dtype=torch.long))
    bad = t.encode(["a"])
    bad[0, -1] = 5
    with pytest.raises(ValueError, match="BOI"):
        t.check(bad)


def test_class_from_caption_reads_the_shape_word():
    assert class_from_caption("a small red inverted triangle in the top left") == CLASSES.index("inverted triangle")
    assert class_from_caption("a large blue triangle at the bottom") == CLASSES.index("triangle")
    assert class_from_caption("a medium cyan horizontal bar on the left") == CLASSES.index("horizontal bar")
    assert class_from_caption("nothing here") == -1
    for i in range(50):  # every shapes caption names its own class
        s = render(TEST_START + i)
        assert class_from_caption(s.caption) == s.label


def test_class_conditioner_interface():
    c = ClassConditioner(ClassConditioner.Config(), 16, num_classes=10)
    labels = torch.tensor([3, 9])
    prefix, vec, valid = c(labels)
    assert prefix.shape == (2, 1, 16) and vec.shape == (2, 16) and valid is None
    assert torch.equal(c.from_batch({"label": labels}), labels)
    assert torch.equal(c.null_like(labels), torch.tensor([10, 10]))

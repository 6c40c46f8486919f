"""`m3i eval TASK`: open the checkpoint and the data once, run the task, record the result.

TASKS is the one registry of eval tasks: a task's runner and what it needs of the data and the
run, checked before the task does any work. A new task is one module and one line here."""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import yaml

from m3i.data.base import ImageSource
from m3i.data.shapes import ShapesDataset
from m3i.data.shapes_detect import ShapesDetection
from m3i.data.specs import eval_spec
from m3i.data.views import eval_annotations, eval_data_config
from m3i.eval.features import (
    EvalError,
    Features,
    backbone_path,
    extract,
    load_backbone,
    open_split,
)
from m3i.eval.knn import knn_scores, topk_accuracy
from m3i.eval.settings import EvalSettings
from m3i.eval.zeroshot import (
    class_embeddings,
    load_classnames,
    load_templates,
    load_text_target,
    zeroshot_scores,
)
from m3i.io import append_jsonl
from m3i.mi.targets.text import TextTarget
from m3i.models.backbone import input_size
from m3i.runtime import pick_device

log = logging.getLogger("m3i.eval")
DETECT = "detect/"  # split-name prefix of the detection scenes (Session.split)


class Need(Enum):
    """What a task needs besides the backbone and a val split (its value says it in words)."""

    LABELS = "labels"  # a class label on every train and val sample
    VAL_LABELS = "val labels"  # a class label on every val sample
    ANNOTATIONS = "masks and boxes"  # every sample's mask and boxes (--data shapes)
    SCENES = "detection scenes"  # the shapes' detection scenes with their boxes (--data shapes)
    TEXT_TOWER = "a text tower"  # the run's trained text target (checkpoint.pt, tokenizer)


class Session:
    """One checkpoint on one dataset: splits opened once, frozen features extracted once."""

    def __init__(self, checkpoint: str | Path, data: str, settings: EvalSettings) -> None:
        self.checkpoint, self.data, self.settings = checkpoint, data, settings
        self.device = pick_device(settings.device, "device")
        self.model = load_backbone(checkpoint)
        self.size = settings.image_size or input_size(self.model)
        # the eval view of every image (and of every mask and box): timm's, at the model's size
        self.data_config = eval_data_config(input_size(self.model), settings.crop_pct)
        self._splits: dict[str, ImageSource] = {}
        self._features: dict[tuple[str, bool], Features] = {}
        self._annotations: dict[str, list[dict[str, torch.Tensor]]] = {}
        self._text_target: TextTarget | None = None

    def split(self, name: str) -> ImageSource:
        """`train` or `val` of the data, or `detect/train`, `detect/val`: as many detection
        scenes (ShapesDetection) as that split of `shapes` holds, at its size and seed."""
        if name not in self._splits:
            if name.startswith(DETECT):
                self._splits[name] = self._detection_scenes(self.split(name.removeprefix(DETECT)))
            else:
                count = self.settings.num_train if name == "train" else self.settings.num_val
                self._splits[name] = open_split(
                    self.data, name, count, self.size, self.settings.data_seed
                )
        return self._splits[name]

    def _detection_scenes(self, source: ImageSource) -> ShapesDetection:
        if not isinstance(source, ShapesDataset):
            raise EvalError(
                f"data {self.data!r} has no masks or boxes; segment and detect run on --data shapes"
            )
        return ShapesDetection(source.split, len(source), source.image_size, source.seed)

    def features(self, name: str, dense: bool = False) -> Features:
        """Frozen features of a split (dense ones also serve pooled requests)."""
        for key in ((name, True), (name, dense)):
            if key in self._features:
                return self._features[key]
        source = self.split(name)
        settings = self.settings
        features = extract(
            self.model, source, settings.batch_size, dense, self.device,
            settings.crop_pct, settings.workers,
        )  # fmt: skip
        self._features[(name, dense)] = features
        return features

    def classes(self, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
        """The class names; an EvalError unless every sample of `splits` has a label."""
        classes = self.split(splits[0]).classes
        if not classes:
            raise EvalError(f"data {self.data!r} has no class labels; this task needs labels")
        for name in splits:
            missing = sum(label < 0 for label in self.split(name).labels())
            if missing:
                raise EvalError(
                    f"data {self.data!r}: {missing} {name} samples have no label; "
                    "classification needs a label on every sample"
                )
        return classes

    def annotations(self, name: str) -> list[dict[str, torch.Tensor]]:
        """Every sample's mask and boxes (each image rendered once per session), in the pixels
        of its eval view: resized and cropped as the images are (eval_annotations)."""
        if name not in self._annotations:
            source = self.split(name)
            if not hasattr(source, "annotations"):
                raise EvalError(
                    f"data {self.data!r} has no masks or boxes; segment and detect run on "
                    "--data shapes"
                )
            canvas = (source.image_size, source.image_size)
            self._annotations[name] = [
                eval_annotations(source.annotations(i), canvas, self.data_config)
                for i in range(len(source))
            ]
        return self._annotations[name]

    def text_target(self) -> TextTarget:
        """The run's trained text target (loaded once per session); an EvalError if none."""
        if self._text_target is None:
            self._text_target = load_text_target(self.checkpoint, self.model.num_features)
        return self._text_target

    def check(self, needs: frozenset[Need]) -> None:
        """An EvalError naming the first of `needs` that the data or the run lacks."""
        checks = {
            Need.TEXT_TOWER: self.text_target,
            Need.ANNOTATIONS: lambda: [self.annotations(name) for name in ("train", "val")],
            Need.SCENES: lambda: [self.annotations(DETECT + name) for name in ("train", "val")],
            Need.LABELS: self.classes,
            Need.VAL_LABELS: lambda: self.classes(("val",)),
        }
        for need, check in checks.items():
            if need in needs:
                check()


def run_knn(session: Session) -> dict[str, float]:
    num_classes = len(session.classes())
    train, val = session.features("train"), session.features("val")
    knn = session.settings.knn
    scores = knn_scores(train.pooled, train.labels, val.pooled, num_classes, knn.k, knn.temperature)
    return topk_accuracy(scores, val.labels)


def run_linear(session: Session) -> dict[str, float]:
    from m3i.eval.linear import linear_probe

    num_classes = len(session.classes())
    train, val = session.features("train"), session.features("val")
    return linear_probe(
        train.pooled,
        train.labels,
        val.pooled,
        val.labels,
        num_classes,
        session.settings.linear,
        session.settings.seed,
    )


def run_finetune(session: Session) -> dict[str, float]:
    from m3i.eval.finetune import finetune

    settings = session.settings.finetune
    model = load_backbone(
        session.checkpoint, num_classes=len(session.classes()), drop_path_rate=settings.drop_path
    )
    return finetune(
        model,
        session.split("train"),
        session.split("val"),
        settings,
        session.settings.seed,
        session.device,
        session.settings.crop_pct,
    )


def run_segment(session: Session) -> dict[str, float]:
    from m3i.eval.segment import segment_probe

    masks = {
        name: torch.stack([a["mask"] for a in session.annotations(name)])
        for name in ("train", "val")
    }
    train, val = session.features("train", dense=True), session.features("val", dense=True)
    return segment_probe(
        train.dense,
        masks["train"],
        val.dense,
        masks["val"],
        len(session.classes()) + 2,  # background, each class, distractors
        session.settings.segment,
        session.settings.seed,
    )


def run_detect(session: Session) -> dict[str, float]:
    """Box AP of a CentreHead on the frozen tokens of the shapes' detection scenes
    (m3i.data.shapes_detect): 2-5 small objects of the ten shape classes per image, partly
    hiding one another, told apart by shape alone."""
    from m3i.eval.detect import detect_probe

    train_name, val_name = DETECT + "train", DETECT + "val"
    boxes = {
        name: ([a["boxes"] for a in session.annotations(name)],
               [a["box_labels"] for a in session.annotations(name)])
        for name in (train_name, val_name)
    }  # fmt: skip
    train = session.features(train_name, dense=True)
    val = session.features(val_name, dense=True)
    scenes = session.split(train_name)
    return detect_probe(
        train.dense,
        *boxes[train_name],
        val.dense,
        *boxes[val_name],
        len(scenes.classes),
        session.data_config["input_size"][-1],  # the boxes' pixels: the eval view's
        session.settings.detect,
        session.settings.seed,
    )


def run_zeroshot(session: Session) -> dict[str, float]:
    target = session.text_target()
    settings = session.settings.zeroshot  # names and templates read before any feature
    classes = load_classnames(settings.classnames, session.classes(("val",)))
    templates = load_templates(settings)
    val = session.features("val")
    prompts = class_embeddings(target, classes, templates)
    return topk_accuracy(zeroshot_scores(target, val.pooled, prompts), val.labels)


@dataclass(frozen=True)
class Task:
    """An eval task: its runner (metrics by name) and what it needs to run."""

    run: Callable[[Session], dict[str, float]]
    needs: frozenset[Need]

    def describe(self) -> str:
        """`labels`, `masks and boxes, labels`, ... in words."""
        return ", ".join(sorted(need.value for need in self.needs))


CHOSEN = ("lr",)  # settings a protocol picked itself (not metrics): recorded under "chosen"
TASKS: dict[str, Task] = {
    "knn": Task(run_knn, frozenset({Need.LABELS})),
    "linear": Task(run_linear, frozenset({Need.LABELS})),
    "finetune": Task(run_finetune, frozenset({Need.LABELS})),
    "segment": Task(run_segment, frozenset({Need.ANNOTATIONS, Need.LABELS})),
    "detect": Task(run_detect, frozenset({Need.SCENES})),
    "zeroshot": Task(run_zeroshot, frozenset({Need.TEXT_TOWER, Need.VAL_LABELS})),
}


def check_task(task: str) -> None:
    """An EvalError naming an unknown task, the closest known one and every task."""
    if task not in TASKS:
        close = difflib.get_close_matches(task, TASKS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise EvalError(f"unknown eval task {task!r}; {hint}tasks: {', '.join(TASKS)}")


def default_data(checkpoint: str | Path) -> str:
    """The data spec a run was trained on (its config.yaml; of a mixture, the first source
    with labelled splits: m3i.data.specs.eval_spec), else `shapes`."""
    config = backbone_path(checkpoint).parent / "config.yaml"
    if config.is_file():
        spec = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("spec")
        if isinstance(spec, str) or (isinstance(spec, list) and spec):
            return eval_spec(spec)
    return "shapes"


def evaluate_each(
    tasks: list[str],
    checkpoint: str | Path,
    data: str | None = None,
    settings: EvalSettings | None = None,
) -> Iterator[dict[str, Any]]:
    """Run tasks on one checkpoint (features shared between them), yielding each task's result
    as soon as it is computed (nothing is recorded)."""
    for task in tasks:
        check_task(task)
    data = data or default_data(checkpoint)
    session = Session(checkpoint, data, settings or EvalSettings())
    session.split("val")  # fail on a missing val split before any work
    for task in tasks:
        start = time.perf_counter()
        session.check(TASKS[task].needs)
        metrics = TASKS[task].run(session)
        chosen = {key: metrics.pop(key) for key in CHOSEN if key in metrics}
        yield {
            "task": task,
            "checkpoint": str(checkpoint),
            "data": data,
            "metrics": metrics,
            "chosen": chosen,
            "seconds": round(time.perf_counter() - start, 1),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }


def record_result(result: dict[str, Any]) -> bool:
    """Append a result to eval.jsonl beside its backbone; when that file cannot be written (a
    read-only run), warn in one line naming it and return False: the caller still holds it."""
    path = backbone_path(result["checkpoint"]).parent / "eval.jsonl"
    try:
        append_jsonl(path, result)
    except OSError as err:
        log.warning("could not record the %s result in %s (%s); it is printed, not saved",
                    result["task"], path, err.strerror)  # fmt: skip
        return False
    return True


def evaluate(
    tasks: list[str],
    checkpoint: str | Path,
    data: str | None = None,
    settings: EvalSettings | None = None,
    record: bool = True,
) -> list[dict[str, Any]]:
    """Run tasks on one checkpoint (features shared between them); one result dict per task,
    appended to eval.jsonl beside the backbone when `record` (see record_result)."""
    results = []
    for result in evaluate_each(tasks, checkpoint, data, settings):
        if record:
            record_result(result)
        results.append(result)
    return results

"""A results folder scored against a labels file: the report's content."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from models.card import ModelCard
from models.registry import ModelRegistry, sha256_file
from node.config import NodeConfig
from node.validate.cases import Case, check_leakage, collect_cases, label_key, merge_by_study, read_labels
from node.validate.scores import (
    SUBGROUPS,
    age_band,
    classification_scores,
    on_grid,
    read_label_map,
    segmentation_scores,
)

IDENTIFIERS = ("Patient ID, Study Instance UID, SOP Instance UID of the source images, Accession Number, "
               "source file stem")
_ABBREVIATION = re.compile(r"\(([A-Za-z0-9/]+)\)")


def pipeline_card(cfg: NodeConfig, pipeline: str) -> tuple[ModelCard, Path, Path]:
    """The model card ``pipeline`` runs (its settings' ``model``), its file and weights.

    Raises
    ------
    ValueError
        The pipeline's settings name no model card.
    """
    settings = getattr(cfg.pipelines, pipeline)
    name = getattr(settings, "model", None)
    if not isinstance(name, str):
        raise ValueError(f"pipeline {pipeline}: its settings name no model card (no 'model')")
    registry = ModelRegistry(cfg.models.card_dirs)
    return registry.card(name), registry.card_path(name), registry.weights_path(name)


def segment_labeller(card: ModelCard):
    """(Segment Label, Segment Number) -> label value: the card's label rule
    whose name has the same abbreviation in parentheses ("Enhancing tumour
    (ET)" -> ET -> 4; "(NCR)" matches "(NCR/NET)"), else the segment number."""
    rules = card.segmentation.label_rules if card.segmentation else []

    def label(segment_label: str, number: int) -> int:
        found = _ABBREVIATION.search(segment_label)
        for rule in rules:
            names = _ABBREVIATION.search(rule.name)
            if found and names and found.group(1).upper() in names.group(1).upper().split("/"):
                return rule.label
        return number

    return label


def _regions(card: ModelCard) -> dict[str, list[int]]:
    if card.segmentation is not None:
        return {r: list(v) for r, v in card.segmentation.regions.items()}
    if card.bundle_output is not None:
        return {n: [v] for v, n in card.bundle_output.labels.items()}
    raise ValueError(f"model card {card.name}: task {card.task} has no segmentation regions")


def evaluate(results_dir: Path, pipeline: str, labels_path: Path, cfg: NodeConfig, config_path: Path | None, *,
             threshold: float | None = None, include_leaked: bool = False) -> dict:
    """The report (JSON-ready) of ``results_dir`` against ``labels_path``.

    Raises
    ------
    ValueError
        A bad labels file, no results, or no labelled result left to score.
    """
    card, card_path, weights_path = pipeline_card(cfg, pipeline)
    task = "classification" if card.task == "classification" else "segmentation"
    labels = read_labels(labels_path, task)
    cases = collect_cases(results_dir, task)
    if task == "classification":
        cases = merge_by_study(cases, labels.column)
    labelled = {c.key: c for c in cases if any(k in labels.values for k in label_key(c, labels.column))}
    seen = {k for c in cases for k in label_key(c, labels.column)}
    leakage = check_leakage(list(labelled.values()), card)
    scored = [c for c in labelled.values() if include_leaked or c.key not in leakage.leaked]
    if not scored:
        raise ValueError(f"no case left to score: {len(labelled)} labelled results, {len(leakage.leaked)} of them "
                         "training or validation members (--include-leaked keeps them)")
    report = {
        "pipeline": pipeline, "task": task, "unit": "images" if labels.column == "SOPInstanceUID" else "studies",
        "model": {"card": card.name, "version": card.version, "card_path": str(card_path),
                  "card_sha256": sha256_file(card_path), "weights_sha256": card.weights.sha256,
                  "weights_path": str(weights_path)},
        "demonstration_only": card.demonstration_only,
        "config": {"path": str(config_path) if config_path else None,
                   "sha256": hashlib.sha256(Path(config_path).read_bytes()).hexdigest()
                   if config_path and Path(config_path).is_file() else None},
        "labels": {"path": str(labels.path), "column": labels.column, "n": len(labels.values)},
        "results_dir": str(results_dir), "n_results": len(cases), "n_unlabelled": len(cases) - len(labelled),
        "labels_without_result": sorted(set(labels.values) - seen),
        "leakage": {"identifiers": IDENTIFIERS, "members_listed": leakage.members_listed, "included": include_leaked,
                    "cases": [{"key": k, "reason": leakage.describe(k)} for k in sorted(leakage.leaked)]},
        "n_scored": len(scored), "scored": [c.key for c in scored],
    }
    if task == "classification":
        report["classification"] = _classify(scored, labels, card, threshold, cfg, pipeline)
    else:
        report["segmentation"] = _segment(scored, labels, card)
    return report


def _label(case: Case, labels) -> object:
    return next(labels.values[k] for k in label_key(case, labels.column) if k in labels.values)


def _classify(cases: list[Case], labels, card: ModelCard, threshold: float | None, cfg: NodeConfig,
              pipeline: str) -> dict:
    thresholds = {}
    configured = getattr(getattr(cfg.pipelines, pipeline), "threshold", None)
    if card.operating_point is not None:
        thresholds["card"] = card.operating_point.threshold
    if configured is not None:
        thresholds["configured"] = float(configured)
    if threshold is not None:
        thresholds["chosen"] = threshold
    if not thresholds:
        thresholds["chosen"] = 0.5
    attributes = {"sex": [c.sex or "unknown" for c in cases], "age_band": [age_band(c.age) for c in cases],
                  "view": [c.view or "unknown" for c in cases],
                  "manufacturer": [c.manufacturer or "unknown" for c in cases]}
    assert set(attributes) == set(SUBGROUPS)
    scores = classification_scores([int(_label(c, labels)) for c in cases],  # type: ignore[call-overload]
                                   [float(c.probability or 0.0) for c in cases],
                                   [c.patient_id or c.key for c in cases], attributes, thresholds)
    scores["cases"] = [{"key": c.key, "patient_id": c.patient_id, "label": _label(c, labels),
                        "probability": c.probability, **{a: v[i] for a, v in attributes.items()}}
                       for i, c in enumerate(cases)]
    return scores


def _segment(cases: list[Case], labels, card: ModelCard) -> dict:
    labeller = segment_labeller(card)
    pairs = []
    for c in cases:
        assert c.seg_path is not None
        truth = read_label_map(_label(c, labels), labeller)  # type: ignore[arg-type]
        pred, truth_arr, spacing = on_grid(read_label_map(c.seg_path, labeller), truth)
        pairs.append((c.key, pred, truth_arr, spacing))
    return segmentation_scores(pairs, _regions(card))

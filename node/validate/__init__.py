"""``ainode validate``: a pipeline scored against the site's own ground truth,
before go-live.

The pipeline runs over a replay (:mod:`node.replay`: a folder, a DICOMweb
root or a DICOM peer, results to a folder), or an earlier replay's results
folder is read again; the results are matched to the site's labels and
scored:

- ``cases``: the source headers recorded during the replay, the results
  read back (SR probability, SEG), the labels file, the leakage check
  against the model card's training and validation members;
- ``scores``: classification (AUROC with a patient-bootstrap interval,
  sensitivity, specificity, accuracy, precision, F1, calibration, ROC, by
  subgroup) and segmentation (MONAI Dice and HD95 per region, bootstrap over
  studies);
- ``report``: one self-contained HTML file (matplotlib figures inline as
  PNG) and a JSON file with every figure.
"""

from node.validate.cases import Case, LeakageCheck, check_leakage, collect_cases, read_labels
from node.validate.scores import classification_scores, segmentation_scores

__all__ = [
    "Case",
    "LeakageCheck",
    "check_leakage",
    "classification_scores",
    "collect_cases",
    "read_labels",
    "segmentation_scores",
]

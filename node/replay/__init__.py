"""``ainode replay``: the node's pipelines over studies an archive already
holds (a folder, a DICOMweb root, a DICOM peer), apart from the clinical
path: the instances go to a work folder of the replay, the results to a
target of its own (a folder, or a destination no route uses), its state to
``replay_runs`` / ``replay_studies`` (:mod:`node.index.replay`).

``sources`` (folder, DICOMweb) and ``dimse`` (C-FIND, C-GET, C-MOVE) list
and fetch; ``run`` does one study after another.
"""

from node.replay.run import Replay, Target, make_target, run_key
from node.replay.sources import FetchError, FolderSource, ListedStudy, ReplayFilters, Source

__all__ = ["FetchError", "FolderSource", "ListedStudy", "Replay", "ReplayFilters", "Source", "Target", "make_target", "run_key"]

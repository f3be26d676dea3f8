"""Brain tumour pipeline benchmark on the CPU: wall time and peak RSS per stage.

Input: a real BraTS case (``../shared/data/brats/BraTS-GLI-00001-000``,
240 x 240 x 155 at 1 mm, four sequences) converted to a DICOM MR study by
``pipelines.brain_tumour.convert.nifti_to_dicom`` in a temporary folder. The
conversion runs in a child process, so this process's peak RSS is the
pipeline's alone.

Stages, in the order the pipeline runs them::

    read        pydicom dcmread + series_to_image of the four series
    reorient    \\
    register     |
    resample     | preprocess_study (its own timings)
    n4           |
    skull_strip  |
    normalise   /
    inference   BrainTumourModel.predict (sliding window)
    map_back    to_reference onto the T1c series
    seg_write   write_seg, sr_write: write_sr (pipelines/brain_tumour/write.py)

The model is the card ``--model`` (default: the node's
``brain_tumour.model`` setting) from the registry. When that card is not
installed, a card is made from the MONAI bundle template with the bundle's
SegResNet architecture and *untrained* (seeded random) weights: the timing and
memory of inference are the bundle's, the labels are meaningless; the JSON
says so under ``model``.

Per stage: wall time ``s`` and process CPU time ``cpu_s`` (all threads; on
a shared machine it shows what the stage costs when wall time is inflated by
other work). Peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` for the whole run,
and per stage the highest resident set a 20 ms sampler thread saw
(``/proc/self/statm``).

``--move-flair`` rotates and shifts FLAIR (3 deg, 4 mm) and puts it on a
1 x 1 x 3 mm grid before conversion, so registration and resampling run.
``--skull-strip always`` times deepbet on the (already stripped) case.

Usage::

    .venv/bin/python bench/brain_tumour.py [--threads 2] [--move-flair] [--skull-strip always] [--untrained-bundle]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import SHARED_DATA  # noqa: E402

DEFAULT_CASE = SHARED_DATA / "brats" / "BraTS-GLI-00001-000"


class RssSampler:
    """Samples this process's resident set size every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def reset(self) -> None:
        self.peak = self.rss()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _move_flair(case: Path, out: Path) -> Path:
    """A copy of the case whose FLAIR moved (3 deg about z, 4 mm) and is on a 1 x 1 x 3 mm grid."""
    import SimpleITK as sitk

    from pipelines.brain_tumour.convert import find_case_files

    out.mkdir(parents=True, exist_ok=True)
    for role, path in find_case_files(case).items():
        target = out / path.name
        if role != "FLAIR":
            target.symlink_to(path)
            continue
        image = sitk.ReadImage(str(path))
        motion = sitk.Euler3DTransform()
        motion.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
        motion.SetRotation(0.0, 0.0, 0.0524)  # 3 degrees
        motion.SetTranslation((4.0, 0.0, 0.0))
        grid = sitk.Image([240, 240, 52], sitk.sitkInt16)
        grid.SetSpacing((1.0, 1.0, 3.0))
        grid.SetOrigin(image.GetOrigin())
        grid.SetDirection(image.GetDirection())
        # The patient moved by `motion`: the scanner sees image(motion^-1(q)).
        moved = sitk.Resample(image, grid, motion.GetInverse(), sitk.sitkLinear, 0, sitk.sitkInt16)
        sitk.WriteImage(moved, str(target))
    return out


def _convert(case: str, out: str, move_flair: bool) -> dict:
    from pipelines.brain_tumour.convert import nifti_to_dicom

    source = Path(case)
    if move_flair:
        source = _move_flair(source, Path(out) / "moved-nifti")
    study = nifti_to_dicom(source, Path(out) / "dicom", patient_name="Bench^BraTS", patient_id="BENCH-BRATS-1")
    return {role: [str(p) for p in s.paths] for role, s in study.series.items()}


def _untrained_bundle_card(folder: Path) -> tuple[object, str]:
    """A registry with the bundle template's card and seeded random weights (timing only)."""
    import torch

    from models.bundle_import import BRATS_TEMPLATE
    from models.registry import ModelRegistry, sha256_file
    from models.segresnet import build_segresnet

    card = json.loads(BRATS_TEMPLATE.read_text())
    params = dict(card["architecture"]["params"])
    torch.manual_seed(0)
    torch.save(build_segresnet(**params).state_dict(), folder / "untrained.pt")
    card.update(name="bench-untrained-segresnet", version="0.0.0", demonstration_only=True)
    card["architecture"] = {"name": "monai-segresnet", "params": params}
    card["weights"] = {"format": "state_dict", "path": "untrained.pt", "sha256": sha256_file(folder / "untrained.pt")}
    (folder / "bench-untrained-segresnet.json").write_text(json.dumps(card))
    return ModelRegistry([folder]), card["name"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", type=Path, default=DEFAULT_CASE, help="BraTS-style NIfTI case folder")
    ap.add_argument("--threads", type=int, default=2, help="torch and SimpleITK threads (default 2)")
    ap.add_argument("--model", default=None, help="model card name (default: the node's brain_tumour.model)")
    ap.add_argument("--untrained-bundle", action="store_true",
                    help="time the MONAI bundle's network (init_filters 16, roi 240x240x160) with random weights")
    ap.add_argument("--n4-shrink", type=int, default=None, help="N4 shrink factor (default: settings.n4_shrink_factor)")
    ap.add_argument("--no-n4", action="store_true", help="skip N4")
    ap.add_argument("--skull-strip", choices=("auto", "always", "never"), default=None)
    ap.add_argument("--move-flair", action="store_true", help="move FLAIR so that registration runs")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    if not args.case.is_dir():
        sys.exit(f"case folder {args.case} not found (../shared/data is absent?)")

    with tempfile.TemporaryDirectory(prefix="bench-brain-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            paths = pool.apply(_convert, (str(args.case), str(tmp), args.move_flair))
        convert_s = time.perf_counter() - t0
        result = run(args, paths, tmp)
        result["setup"] = {
            "convert_nifti_to_dicom_s": round(convert_s, 2), "case": str(args.case), "move_flair": args.move_flair
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def run(args, paths: dict[str, list[str]], tmp: Path) -> dict:
    import numpy as np
    import pydicom
    import SimpleITK as sitk
    import torch

    from pipelines.base import PipelineContext
    from pipelines.brain_tumour.preprocess import preprocess_study, to_reference
    from pipelines.brain_tumour.settings import BrainTumourSettings
    from pipelines.brain_tumour.volume import series_to_image

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    settings = BrainTumourSettings()
    sampler = RssSampler().start()
    stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(name: str):
        sampler.reset()
        t, c = time.perf_counter(), time.process_time()
        yield
        stages[name] = {
            "s": round(time.perf_counter() - t, 3),
            "cpu_s": round(time.process_time() - c, 3),
            "peak_rss_mb": round(sampler.peak / 2**20, 1),
        }

    # The model loads once per node, before any study: not part of the study's time.
    t = time.perf_counter()
    model, model_info = load_model(args, settings, tmp)
    load_s = time.perf_counter() - t
    brain_extractor = None
    if (args.skull_strip or settings.skull_strip) == "always":
        from pipelines.brain_tumour.skull_strip import DeepbetExtractor

        brain_extractor = DeepbetExtractor("cpu")

    t_study, c_study = time.perf_counter(), time.process_time()
    with stage("read"):
        datasets = {role: [pydicom.dcmread(p) for p in ps] for role, ps in paths.items()}
        volumes = {role: series_to_image(ds) for role, ds in datasets.items()}

    sampler.reset()
    t, c = time.perf_counter(), time.process_time()
    prep = preprocess_study(
        volumes,
        channel_order=model.channels if model else ("T1c", "T1", "T2", "FLAIR"),
        reference_role=settings.reference_role,
        n4=not args.no_n4,
        n4_shrink_factor=args.n4_shrink or settings.n4_shrink_factor,
        skull_strip=args.skull_strip or settings.skull_strip,
        brain_extractor=brain_extractor,
    )
    preprocess_peak = sampler.peak
    for name, seconds in prep.timings.items():
        stages[name] = {"s": round(seconds, 3), "cpu_s": round(prep.cpu_seconds[name], 3)}
    stages["preprocess_total"] = {
        "s": round(time.perf_counter() - t, 3),
        "cpu_s": round(time.process_time() - c, 3),
        "peak_rss_mb": round(preprocess_peak / 2**20, 1),
    }

    labels = None
    if model is not None:
        with stage("inference"):
            prediction = model.predict(prep.array, spacing_mm=prep.spacing_mm)
            labels = prediction.labels
        stages["inference"]["model_timings_s"] = {k: round(v, 3) for k, v in prediction.timings.items()}
    else:
        labels = np.zeros(prep.array.shape[1:], np.uint8)

    reference = volumes[settings.reference_role]
    with stage("map_back"):
        on_reference = to_reference(labels, prep, reference)

    try:
        from pipelines.brain_tumour import write
        from pipelines.common.identity import AlgorithmDescription
    except ImportError as exc:  # the writer is another engineer's module
        stages["seg_write"] = {"skipped": f"pipelines.brain_tumour.write not importable: {exc}"}
    else:
        algorithm = AlgorithmDescription(name=model_info["name"], version=model_info["version"])
        context = PipelineContext()
        sources = {role: list(volumes[role].datasets) for role in volumes}
        ref_datasets = list(reference.datasets)
        with stage("seg_write"):
            seg, _ = write.write_seg(ref_datasets, on_reference, sources=sources, algorithm=algorithm, context=context)
        with stage("sr_write"):
            write.write_sr(ref_datasets, seg, sources=sources, algorithm=algorithm, context=context)
    study_s, study_cpu = time.perf_counter() - t_study, time.process_time() - c_study
    sampler.stop()

    return {
        "benchmark": "brain_tumour",
        "input_shape_dhw": list(prep.array.shape[1:]),
        "channels": list(prep.channel_order),
        "stages": stages,
        "study_total_s": round(study_s, 2),
        "study_total_cpu_s": round(study_cpu, 2),
        "model_load_s": round(load_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "targets": {"study_total_s": 120, "peak_rss_mb": 6144},
        "model": model_info,
        "preprocess_notes": prep.notes,
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
                    "python": platform.python_version(), "torch": torch.__version__},
    }


def load_model(args, settings, tmp: Path):
    """The model to time, and what the JSON says about it."""
    try:
        from models.registry import ModelNotFoundError, ModelRegistry
        from pipelines.brain_tumour.model import BrainTumourModel
    except ImportError as exc:
        return None, {"name": "none", "version": "0", "note": f"no model module: {exc}; inference not timed"}
    name = args.model or settings.model

    def untrained(why: str | None = None):
        registry, fallback = _untrained_bundle_card(tmp)
        model = BrainTumourModel(registry, fallback, "cpu")
        info = {
            "name": model.name,
            "version": model.version,
            "weights": "untrained SegResNet with the MONAI bundle's architecture and roi: "
            "timing and memory of the bundle's inference, labels meaningless",
        }
        return model, info | ({"why": why} if why else {})

    if args.untrained_bundle:
        return untrained()
    try:
        model = BrainTumourModel(ModelRegistry(), name, "cpu")
        return model, {"name": model.name, "version": model.version, "weights": "card " + name}
    except (ModelNotFoundError, FileNotFoundError) as exc:
        if args.model:
            raise
        return untrained(f"card {name!r} not available: {exc}")

if __name__ == "__main__":
    main()

"""``ainode tools``: building test studies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.cli.common import ConfigOpt, _config

tools_app = typer.Typer(help="Tools for building test studies.", no_args_is_help=True)


@tools_app.command("nifti-to-dicom")
def nifti_to_dicom_cmd(
    case_dir: Annotated[Path, typer.Argument(help="BraTS-style case folder: *-t1n/-t1c/-t2w/-t2f or *_t1/_t1c/_t2/_fla(ir) .nii.gz.")],
    out: Annotated[Path, typer.Option(help="Folder for the DICOM study (one subfolder per series).")],
    patient_name: Annotated[str, typer.Option(help="Patient's Name, PN: Family^Given.")] = "Phantom^Brain",
    patient_id: Annotated[str, typer.Option(help="Patient ID.")] = "BRATS0001",
    study_date: Annotated[str, typer.Option(help="Study Date, YYYYMMDD.")] = "20000101",
    config: ConfigOpt = None,
) -> None:
    """Turn a BraTS-style NIfTI case into a DICOM MR study of four series
    (T1, T1c, T2, FLAIR) with one Study Instance UID and Frame of Reference."""
    from pipelines.brain_tumour.convert import nifti_to_dicom

    cfg = _config(config)
    try:
        study = nifti_to_dicom(
            case_dir, out, patient_name=patient_name, patient_id=patient_id,
            uid_prefix=cfg.node.uid_prefix, study_date=study_date,
        )
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    for role, series in study.series.items():
        typer.echo(f"{role:<6} {len(series.paths):>4} files  {series.paths[0].parent}")
    typer.echo(f"Study Instance UID {study.study_instance_uid}")

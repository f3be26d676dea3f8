"""``ainode replay SOURCE``: a pipeline over studies an archive already holds,
apart from the clinical path (:mod:`node.replay`), with a progress bar, a
resumable state in the index and a summary."""

from __future__ import annotations

import datetime as dt
import enum
from pathlib import Path
from typing import Annotated

import typer

from node.cli.common import ConfigOpt, _config, _logging, parse_peer
from node.config import NodeConfig

DEFAULT_AE = "AINODE_REPLAY"


class FetchMode(enum.StrEnum):
    """How a DICOM peer's studies are fetched."""

    GET = "get"  # C-GET, PS3.4 C.4.3: on the replay's own association
    MOVE = "move"  # C-MOVE, PS3.4 C.4.2: to the replay's own storage SCP (--move-ae)


def _date(value: str | None, option: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{option}: expected a date such as 2024-01-31 or 20240131, got {value!r}") from None


def _study_list(path: Path | None) -> tuple[str, ...] | None:
    """``--studies FILE``: one Study Instance UID a line; blank lines and ``#`` comments skipped."""
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise typer.BadParameter(f"--studies: cannot read {path}: {exc.strerror or exc}") from None
    return tuple(dict.fromkeys(s for line in lines if (s := line.split("#", 1)[0].strip())))


def _source(value: str, cfg: NodeConfig, fetch: FetchMode, calling_ae: str, move_ae: str | None,
            move_port: int | None, move_bind: str):
    """SOURCE -> a :class:`node.replay.Source`: ``http(s)://...`` DICOMweb, an
    existing folder, else ``AE@HOST:PORT``."""
    from node.config.base import _check_ae_title
    from node.replay.dimse import DicomPeerSource, MoveReceiver
    from node.replay.sources import DicomwebSource, FolderSource

    if value.startswith(("http://", "https://")):
        return DicomwebSource(value)
    if Path(value).is_dir():
        return FolderSource(Path(value))
    if "@" not in value:
        raise typer.BadParameter(f"SOURCE: {value!r} is neither a folder, an http(s):// DICOMweb root nor AE@HOST:PORT")
    peer_ae, host, port = parse_peer(value)
    try:
        calling_ae = _check_ae_title(calling_ae)
        move_ae = _check_ae_title(move_ae or calling_ae)
    except ValueError as exc:
        raise typer.BadParameter(f"--calling-ae/--move-ae: {exc}") from None
    receiver = None
    if fetch is FetchMode.MOVE:
        if move_port is None:
            raise typer.BadParameter("--fetch move needs --move-port (where the replay's own storage SCP listens)")
        if move_ae == cfg.node.ae_title or move_port == cfg.node.port:
            raise typer.BadParameter(
                f"--move-ae {move_ae} --move-port {move_port}: that is the node's clinical SCP "
                f"({cfg.node.ae_title}, port {cfg.node.port}); replay needs an AE title and port of its own"
            )
        try:
            receiver = MoveReceiver(move_ae, move_bind, move_port, peer_ae)
        except OSError as exc:
            raise typer.BadParameter(f"--move-port {move_port}: cannot listen: {exc.strerror or exc}") from None
    return DicomPeerSource(peer_ae, host, port, calling_ae=calling_ae, fetch_mode=fetch, receiver=receiver)


def _run(index, key: str, resume: int | None, new_run: bool, source, filters, pipeline: str, target):
    """The run to continue (``--resume``, or the latest with the same key) or a new one."""
    if resume is not None:
        try:
            run = index.replay_run(resume)
        except LookupError:
            raise typer.BadParameter(f"--resume {resume}: no such replay run") from None
        if run.key != key:
            raise typer.BadParameter(
                f"--resume {resume}: that run replayed {run.source} with filters {run.filters}, pipeline {run.pipeline} "
                f"to {run.target}; give the same SOURCE, filters, --pipeline and target (or start a new run)"
            )
        return run
    run = None if new_run else index.replay_run_latest(key)
    return run or index.replay_run_create(key=key, source=source.label, filters=filters.to_json(), pipeline=pipeline,
                                          target=target.label)


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            elapsed = task.finished_time if task.finished else task.elapsed
            return Text(f"{task.completed / elapsed * 60:.1f} studies/min" if task.completed and elapsed else "-- studies/min")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn())


def _summary(index, run, interrupted: bool) -> int:
    """Print the run's summary; returns the exit status (1 if a study failed)."""
    from node.index.replay import ReplayStudyState as S

    counts = index.replay_counts(run.id)
    typer.echo(
        f"replay run {run.id}: studies seen {sum(counts.values())}, processed {counts[S.DONE]}, "
        f"not applicable {counts[S.NOT_APPLICABLE]}, out of scope {counts[S.OUT_OF_SCOPE]}, "
        f"failed {counts[S.FAILED]}, pending {counts[S.PENDING]}"
    )
    for state in (S.FAILED, S.NOT_APPLICABLE, S.OUT_OF_SCOPE):
        for study in index.replay_studies(run.id, [state]):
            typer.echo(f"  {state} {study.study_uid}: {study.reason}")
    if interrupted or counts[S.PENDING]:
        typer.echo(f"resume with: ainode replay ... --resume {run.id} (or the same command again)")
    return 1 if counts[S.FAILED] else 0


def replay(
    source: Annotated[str, typer.Argument(help="A folder, a DICOMweb root (http(s)://.../dicom-web) or a DICOM peer AE@HOST:PORT.")],
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="Pipeline name, e.g. pneumonia.")],
    to: Annotated[str | None, typer.Option("--to", help="A configured destination no route uses, for the results.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="A folder for the results (the folder kind's layout).")] = None,
    since: Annotated[str | None, typer.Option(help="First Study Date (YYYY-MM-DD), included.")] = None,
    until: Annotated[str | None, typer.Option(help="Last Study Date (YYYY-MM-DD), included.")] = None,
    modality: Annotated[list[str] | None, typer.Option("--modality", help="Studies with this modality (repeatable).")] = None,
    studies: Annotated[Path | None, typer.Option("--studies", help="File of Study Instance UIDs, one a line.")] = None,
    fetch: Annotated[FetchMode, typer.Option(help="DICOM peer: C-GET or C-MOVE.")] = FetchMode.GET,
    calling_ae: Annotated[str, typer.Option(help="Our AE title towards a DICOM peer.")] = DEFAULT_AE,
    move_ae: Annotated[str | None, typer.Option(help="C-MOVE destination AE title (default: --calling-ae).")] = None,
    move_port: Annotated[int | None, typer.Option(help="Port of the replay's storage SCP for C-MOVE.")] = None,
    move_bind: Annotated[str, typer.Option(help="Address the C-MOVE storage SCP binds.")] = "0.0.0.0",
    resume: Annotated[int | None, typer.Option(help="Continue this replay run (its id).")] = None,
    new_run: Annotated[bool, typer.Option("--new-run", help="Start a new run even if the same replay ran before.")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after this many studies (the rest stay pending).")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Work folder for fetched instances (default: beside the spool).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Replay an archive's studies through a pipeline, apart from the clinical path.

    The instances go to the replay's work folder (never the spool), results to
    --out or --to (never a route's destination), state to the index: the same
    SOURCE, filters, --pipeline and target again resume the latest such run
    (finished studies are not run again, failed ones are); --new-run starts
    afresh. Exit status 1 if a study failed, 130 when interrupted."""
    from node.index import Index
    from node.replay import FetchError, Replay, ReplayFilters, make_target, run_key
    from pipelines.registry import registry

    cfg = _config(config)
    _logging(cfg, "WARNING")
    if pipeline not in registry():
        raise typer.BadParameter(registry().unknown(pipeline))
    try:
        filters = ReplayFilters(_date(since, "--since"), _date(until, "--until"),
                                tuple(m.upper() for m in modality or ()), _study_list(studies))
        target = make_target(cfg, to, out)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    work = (work_dir or cfg.storage.spool_dir.parent / "replay").resolve()
    for clinical in (cfg.storage.spool_dir, cfg.storage.outbox_dir):
        if work.is_relative_to(Path(clinical).resolve()):
            raise typer.BadParameter(f"--work-dir {work} lies in the node's {clinical}; replay keeps apart from it")
    src = _source(source, cfg, fetch, calling_ae, move_ae, move_port, move_bind)
    index = Index(cfg.storage.engine_url())
    interrupted, run = False, None
    try:
        run = _run(index, run_key(src, filters, pipeline, target), resume, new_run, src, filters, pipeline, target)
        try:
            added = index.replay_add_studies(run.id, ((s.study_uid, s.study_date, "\\".join(s.modalities)[:64] or None)
                                                      for s in src.list_studies(filters)))
        except FetchError as exc:
            typer.echo(f"cannot list {src.label}: {exc}", err=True)
            raise typer.Exit(1) from None
        job = Replay(cfg, index, src, run, target, work, say=typer.echo)
        todo = job.todo()[:limit]
        typer.echo(f"replay run {run.id}: {src.label} -> {target.label}, pipeline {pipeline}; "
                   f"{added} new studies listed, {len(todo)} to do")
        interrupted = _loop(job, todo)
    finally:
        src.close()
        status = _summary(index, run, interrupted) if run is not None else 1
        index.close()
    raise typer.Exit(130 if interrupted else status)


def _loop(job, todo) -> bool:
    """Process ``todo`` under the progress bar; True when interrupted (Ctrl-C)."""
    with _progress() as progress:
        task = progress.add_task("replay", total=len(todo))
        try:
            for study in todo:
                progress.update(task, description=f"study {study.study_uid[-12:]}")
                outcome = job.process(study.study_uid)
                progress.console.print(f"{study.study_uid}: {outcome.state}" + (f": {outcome.reason}" if outcome.reason else ""),
                                       markup=False, highlight=False)
                progress.advance(task)
        except KeyboardInterrupt:
            return True
    return False

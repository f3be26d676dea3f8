"""Input drift (:mod:`node.drift`): each job's input features, so that the
sliding window of each model survives a restart, and the reference each
model was compared with (its card's ``drift_reference``), so that the
statistics are back at start-up before a pipeline is loaded.

Rows are kept per model up to the window's size: older ones are deleted as
new ones come (they hold no patient identifiers, only the features of
:class:`models.drift_reference.DriftFeature`)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping

from sqlalchemy import DateTime, Integer, String, Text, delete, select
from sqlalchemy.orm import Mapped, mapped_column

from node.index.core import IndexCore
from node.index.schema import Base, utcnow

#: (pipeline, model version): the key of a model's window.
ModelKey = tuple[str, str]


class DriftObservation(Base):
    """One job's input features (JSON: feature -> category or number)."""

    __tablename__ = "drift_observations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[int | None] = mapped_column(Integer)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    features: Mapped[str] = mapped_column(Text)


class DriftModel(Base):
    """The reference a model's window is compared with (JSON of
    :class:`models.drift_reference.DriftReference`), from its card."""

    __tablename__ = "drift_models"
    pipeline: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(128), primary_key=True)
    card: Mapped[str] = mapped_column(String(128))
    reference: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class DriftQueries(IndexCore):
    """The drift windows and references (module docstring)."""

    def drift_record(self, key: ModelKey, features: Mapping[str, str | float], *, keep: int,
                     job_id: int | None = None) -> None:
        """Add one job's features to model ``key``'s window and delete its
        rows beyond the newest ``keep``."""
        pipeline, version = key
        with self._write_lock, self._session.begin() as s:
            s.add(DriftObservation(pipeline=pipeline, model_version=version, job_id=job_id,
                                   features=json.dumps(dict(features), sort_keys=True)))
            s.flush()
            cutoff = s.scalar(
                select(DriftObservation.id)
                .where(DriftObservation.pipeline == pipeline, DriftObservation.model_version == version)
                .order_by(DriftObservation.id.desc()).offset(keep).limit(1)
            )
            if cutoff is not None:
                s.execute(delete(DriftObservation).where(
                    DriftObservation.pipeline == pipeline, DriftObservation.model_version == version,
                    DriftObservation.id <= cutoff,
                ))

    def drift_windows(self, size: int) -> dict[ModelKey, list[dict]]:
        """Each model's newest ``size`` feature rows, oldest first."""
        out: dict[ModelKey, list[dict]] = {}
        with self._session() as s:
            keys = s.execute(select(DriftObservation.pipeline, DriftObservation.model_version).distinct()).all()
            for pipeline, version in keys:
                rows = s.scalars(
                    select(DriftObservation.features)
                    .where(DriftObservation.pipeline == pipeline, DriftObservation.model_version == version)
                    .order_by(DriftObservation.id.desc()).limit(size)
                ).all()
                out[(pipeline, version)] = [json.loads(r) for r in reversed(rows)]
        return out

    def drift_set_reference(self, key: ModelKey, card: str, reference_json: str) -> None:
        """Store (or replace) model ``key``'s reference."""
        pipeline, version = key
        with self._write_lock, self._session.begin() as s:
            row = s.get(DriftModel, (pipeline, version))
            if row is None:
                s.add(DriftModel(pipeline=pipeline, model_version=version, card=card, reference=reference_json))
            elif row.reference != reference_json or row.card != card:
                row.card, row.reference, row.updated_at = card, reference_json, utcnow()

    def drift_references(self) -> dict[ModelKey, tuple[str, str]]:
        """Model -> (card name, reference JSON)."""
        with self._session() as s:
            return {(r.pipeline, r.model_version): (r.card, r.reference) for r in s.scalars(select(DriftModel))}

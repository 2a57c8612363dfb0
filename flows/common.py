"""Prefect glue shared by the flows: opening the run, progress artifacts, iteration artifacts."""

from __future__ import annotations

import re

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from alignment.report import judge_table, summary_markdown
from alignment.runs import open_run  # noqa: F401  (re-exported for the flows)
from alignment.store import RunStore


def _key(*parts: object) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")[:100]


def progress_factory(store: RunStore):
    """A callback factory: (stage, t) -> progress(done, total) updating a Prefect progress artifact."""

    def factory(stage: str, t: int):
        artifact_id = create_progress_artifact(progress=0.0, description=f"iteration {t} {stage}: shards done")

        def progress(done: int, total: int) -> None:
            update_progress_artifact(artifact_id, progress=100.0 * done / max(1, total))

        return progress

    return factory


def review_url(t: int) -> str | None:
    import os

    base = os.environ.get("SELFALIGN_REVIEW_URL")
    return f"{base.rstrip('/')}/iterations/{t}" if base else None


def publish_iteration(store: RunStore, t: int, metrics: dict) -> None:
    name = store.run_info().get("name", store.root.name)
    create_markdown_artifact(
        key=_key(name, "iter", t, "summary"),
        markdown=summary_markdown(metrics, review_url=review_url(t)),
        description=f"Self-Rewarding iteration {t} summary",
    )
    create_table_artifact(
        key=_key(name, "iter", t, "judge"),
        table=judge_table(store.read_rows(t, "judge")),
        description=f"iteration {t} judge results (first 200 responses)",
    )

"""Prefect glue shared by the flows: opening the run, progress artifacts, iteration artifacts."""

from __future__ import annotations

import re

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from alignment.report import judge_table, summary_markdown
from alignment.review_urls import iteration_url
from alignment.runs import open_run  # noqa: F401  (re-exported for the flows)
from alignment.store import RunStore


def artifact_key(*parts: object) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")[:100]


def progress_factory(store: RunStore):
    """A callback factory: (stage, t) -> progress(done, total) updating a Prefect progress artifact."""

    def factory(stage: str, t: int):
        artifact_id = create_progress_artifact(progress=0.0, description=f"iteration {t} {stage}: shards done")

        def progress(done: int, total: int) -> None:
            update_progress_artifact(artifact_id, progress=100.0 * done / max(1, total))

        return progress

    return factory


def publish_iteration(store: RunStore, t: int, metrics: dict, *, review_base: str) -> None:
    name = store.run_info().get("name", store.root.name)
    url = iteration_url(review_base, t)
    create_markdown_artifact(
        key=artifact_key(name, "iter", t, "summary"),
        markdown=summary_markdown(metrics, review_url=url),
        description=f"iteration {t} summary",
    )
    create_link_artifact(
        key=artifact_key(name, "iter", t, "review"), link=url, link_text=f"Review iteration {t} judge data",
        description=f"served by `selfalign review {store.root}`",
    )
    create_table_artifact(
        key=artifact_key(name, "iter", t, "judge"),
        table=judge_table(store.read_rows(t, "judge")),
        description=f"iteration {t} judge results (first 200 responses)",
    )

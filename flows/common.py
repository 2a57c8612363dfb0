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

from alignment import console
from alignment.report import judge_table, summary_markdown
from alignment.review_urls import iteration_url
from alignment.store import RunStore


def artifact_key(*parts: object) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")[:100]


def shards_done_at_start(store: RunStore, t: int, stage: str) -> int:
    """Shards of the stage already on disk when it (re)started: the ``done`` of its latest
    "shards" event (``alignment.stages.run_sharded`` records the plan before computing)."""
    for event in reversed(store.events()):
        if event.get("event") == "shards" and event.get("iteration") == t and event.get("stage") == stage:
            return int(event.get("done") or 0)
    return 0


def progress_factory(store: RunStore):
    """A callback factory: (stage, t) -> progress(done, total) updating a Prefect progress artifact
    and the console's bar for the stage (:mod:`alignment.console`: a bar on a terminal, plain
    lines elsewhere). The pace counts only the shards computed by this process."""

    def factory(stage: str, t: int):
        artifact_id = create_progress_artifact(progress=0.0, description=f"iteration {t} {stage}: shards done")
        started = console.current().clock()
        bar: list[console.Progress] = []  # made at the first update, when the plan is recorded

        def progress(done: int, total: int) -> None:
            if not bar:
                bar.append(console.current().progress(f"iter {t} {stage}", unit="shard", started=started,
                                                      start_done=shards_done_at_start(store, t, stage)))
            bar[0].update(done, total)
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

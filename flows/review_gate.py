"""The optional review gate: pause before training until a person decides in the Prefect UI."""

from __future__ import annotations

from typing import Literal

from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.settings import PREFECT_API_URL

from alignment.report import summary_markdown
from alignment.review_urls import iteration_url


class ReviewDecision(RunInput):
    """Shown as a form in the Prefect UI when the flow pauses."""

    decision: Literal["approve", "approve_with_corrections", "stop"] = "approve"
    note: str = ""


class ReviewStopped(RuntimeError):
    """A reviewer chose 'stop': the run ends before training and stays resumable."""


def review_gate(store, t: int, metrics: dict, *, review_url: str, timeout_s: int, logger) -> ReviewDecision:
    """Pause the flow run until a reviewer approves (the UI shows the summary and the review link).

    ``approve_with_corrections`` means the corrections already saved in the review app are used:
    the train stage reads ``corrections.jsonl`` either way, so the two approvals differ only in
    what is recorded.
    """
    if not PREFECT_API_URL.value():
        raise RuntimeError(
            "review.gate needs a Prefect server a person can open: run `make ui` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api, then `selfalign resume` this run"
        )
    url = iteration_url(review_url, t)
    description = (
        summary_markdown(metrics, review_url=url)
        + f"\n\nReview the judge data at {url} (`selfalign review {store.root}`), "
        "then choose approve, approve_with_corrections or stop."
    )
    logger.info(f"iteration {t}: waiting for review approval in the Prefect UI ({url})")
    store.log_event("review_wait", t=t, stage="train", url=url)
    decision: ReviewDecision = pause_flow_run(
        wait_for_input=ReviewDecision.with_initial_data(description=description), timeout=timeout_s
    )
    store.log_event("review_decision", t=t, stage="train", decision=decision.decision, note=decision.note)
    if decision.decision == "stop":
        raise ReviewStopped(f"iteration {t}: reviewer stopped the run before training ({decision.note or 'no note'})")
    return decision


def gate_before(run, stage: str, t: int, logger) -> None:
    """The review gate before ``stage`` of iteration t, if the recipe has one and the stage is not done."""
    review = getattr(run.recipe, "review", None)
    if review is not None and review.gate and run.store.manifest(t, stage) is None:
        review_gate(run.store, t, run.metrics(t), review_url=review.url, timeout_s=review.timeout_s, logger=logger)

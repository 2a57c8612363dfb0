"""Addresses of the review app's pages, built in one place.

The app's routes and every link the project publishes (Prefect artifacts, the review gate)
come from here, so a published link cannot drift from what the app serves.
"""

from __future__ import annotations

ITERATION_ROUTE = "/iter/{t}"  # Starlette route of an iteration's page (the app parses t itself)


def iteration_path(t: int) -> str:
    """Path of iteration ``t``'s page: ``/iter/<t>``."""
    return f"/iter/{int(t)}"


def iteration_url(base: str, t: int) -> str:
    """URL of iteration ``t``'s page under ``base`` (where ``selfalign review`` serves):
    ``base`` without trailing slashes + ``/iter/<t>``."""
    return base.rstrip("/") + iteration_path(t)

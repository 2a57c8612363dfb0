"""Which Prefect flow runs which algorithm. Every flow takes (run_dir, recipe_path, overrides)
and returns a dict of what it produced (run_dir first), printed by the CLI."""

from __future__ import annotations

import importlib

FLOWS = {
    "self-rewarding": ("flows.self_rewarding", "self_rewarding_flow"),
    "meta-rewarding": ("flows.meta_rewarding", "meta_rewarding_flow"),
    "spin": ("flows.spin", "spin_flow"),
    "perl": ("flows.perl", "perl_flow"),
    "pipeline": ("flows.pipeline", "pipeline_flow"),
}


def flow_for(algorithm: str):
    module, name = FLOWS[algorithm]
    return getattr(importlib.import_module(module), name)


def presentation(algorithm: str):
    """The algorithm's artifacts and result (``SHOW`` in its flow module), for a pipeline's step."""
    return importlib.import_module(FLOWS[algorithm][0]).SHOW


def all_flows() -> list:
    flows = []
    for algorithm, (module, _) in FLOWS.items():
        try:
            flows.append(flow_for(algorithm))
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return flows

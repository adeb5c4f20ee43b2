"""The reference docs keep up with the code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trio_router.config import RouterConfig
from trio_router.sim.worker import SimWorkerConfig

DOCS = Path(__file__).parent.parent / "docs"


def test_every_option_is_in_the_configuration_reference():
    text = (DOCS / "configuration.md").read_text()
    for cls in (RouterConfig, SimWorkerConfig):
        for field in dataclasses.fields(cls):
            assert "--" + field.name.replace("_", "-") in text, field.name


def test_every_control_endpoint_is_in_the_api_reference():
    from trio_router.control import create_control_app

    text = (DOCS / "http-api.md").read_text()
    app_rules = {
        "/add_worker", "/remove_worker", "/list_workers", "/workers", "/health", "/readiness",
        "/metrics", "/prometheus", "/dashboard", "/retrieve_from_text",
    }  # fmt: skip
    for rule in app_rules:
        assert f"`{rule}" in text, rule
    assert create_control_app  # the endpoints above are the ones it serves (tests/test_control.py)

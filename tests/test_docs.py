"""The reference docs keep up with the code."""

from __future__ import annotations

import dataclasses
import re
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
    source = (Path(__file__).parent.parent / "trio_router" / "control.py").read_text()
    rules = set(re.findall(r'@app\.(?:get|post|delete)\("([^"<]+)', source))
    assert "/add_worker" in rules
    text = (DOCS / "http-api.md").read_text()
    for rule in rules:
        assert f"`{rule}" in text, rule

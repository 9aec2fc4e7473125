"""The attribution-method registry: the config's choices come from it and ``node_effects``
dispatches through it."""

from __future__ import annotations

import pytest
import torch
from circuit_fixtures import HOOKS, setup

from saelab.analysis.circuits import (
    ATTRIBUTION_METHODS,
    CIRCUIT_METHODS,
    CircuitConfig,
    attribution_patching,
    integrated_gradients,
    node_effects,
    register_method,
)
from saelab.errors import SaelabError

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


def test_the_config_choices_are_the_registered_methods():
    assert CIRCUIT_METHODS == tuple(ATTRIBUTION_METHODS) == ("atp", "ig")
    with pytest.raises(SaelabError, match=r"one of \('atp', 'ig'\), got 'nope'"):
        CircuitConfig(method="nope")


def test_node_effects_dispatches_by_name():
    spliced, batch = setup("gpt2", dtype=torch.float64)
    pairs = [
        (node_effects(spliced, batch, "atp"), attribution_patching(spliced, batch)),
        (node_effects(spliced, batch, "ig", ig_steps=3), integrated_gradients(spliced, batch, 3)),
    ]
    for by_name, direct in pairs:
        assert by_name.method == direct.method
        for hook in HOOKS:
            assert torch.equal(by_name.features[hook], direct.features[hook])
            assert torch.equal(by_name.errors[hook], direct.errors[hook])
    with pytest.raises(
        SaelabError, match="unknown attribution method .nope.; choose one of: atp, ig"
    ):
        node_effects(spliced, batch, "nope")


def test_a_registered_method_is_reachable_by_name_and_accepted_by_the_config():
    spliced, batch = setup("gpt2", dtype=torch.float64)
    calls = []

    @register_method("test_atp")
    def by_test(spliced, batch, metric, *, ig_steps, progress):
        calls.append(ig_steps)
        return attribution_patching(spliced, batch, metric)

    try:
        assert CircuitConfig(method="test_atp").method == "test_atp"
        node_effects(spliced, batch, "test_atp", ig_steps=7)
        assert calls == [7]
    finally:
        del ATTRIBUTION_METHODS["test_atp"]

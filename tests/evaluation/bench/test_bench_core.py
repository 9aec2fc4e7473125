"""``saelab bench core`` is ``saelab eval`` (the same options and metrics) as a suite."""

from __future__ import annotations

import dataclasses
import inspect

import saelab.evaluation as evaluation
from saelab.config import SAEConfig
from saelab.evaluation.bench.core import CoreBenchConfig, run_core
from saelab.evaluation.config import EvalConfig
from saelab.evaluation.evaluate import evaluate_sae_dirs
from saelab.saes import TopKSAE
from saelab.saes.storage import save_sae


def test_the_options_are_evals_and_match_its_defaults():
    assert [f.name for f in dataclasses.fields(CoreBenchConfig)] == [
        f.name for f in dataclasses.fields(EvalConfig)
    ]
    defaults = inspect.signature(evaluate_sae_dirs).parameters
    for field in dataclasses.fields(CoreBenchConfig):
        assert defaults[field.name].default == field.default


def test_core_reports_every_eval_metric_with_the_sae_info(tmp_path, monkeypatch):
    folder = tmp_path / "blocks.1.hook_resid_post-topk-x2-k4-seed3"
    sae = TopKSAE(SAEConfig(hook="blocks.1.hook_resid_post", k=4, expansion=2, seed=3), d_in=8)
    save_sae(sae, folder)
    calls = []

    def fake_eval(specs, **kwargs):
        calls.append(kwargs)
        return {"saes": [{"sae_dir": str(folder), "metrics": {"l0": 4.0, "fvu": 0.2}}]}

    monkeypatch.setattr(evaluation, "evaluate_sae_dirs", fake_eval)
    result = run_core([folder], CoreBenchConfig(tokens=512), progress=False)
    assert calls[0]["tokens"] == 512 and calls[0]["write_summary"] is False
    entry = result["saes"][str(folder)]
    assert entry["metrics"] == {"l0": 4.0, "fvu": 0.2}
    assert entry["info"]["seed"] == 3 and entry["info"]["architecture"] == "topk"
    assert entry["info"]["l0"] == 4.0

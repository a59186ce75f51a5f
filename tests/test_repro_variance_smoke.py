"""Smoke runs (seconds) of the variance-reduction and stochastic-LiPrune reproductions, so they cannot rot: each
writes its table with provenance, its claims and its figure."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("bench.common", reason="the bench/ folder ships with the repository, not the package")


@pytest.mark.parametrize("name", ["repro_variance_reduction", "repro_stochastic_liprune"])
def test_repro_smoke_writes_table_claims_and_figure(name, tmp_path, capsys):
    import importlib
    module = importlib.import_module(f"bench.{name}")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    text = (tmp_path / f"{name}.md").read_text()
    assert "## Claims" in text and "commit " in text and f"command: `python -m bench.{name} --smoke" in text
    assert "nan" not in text.lower()
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["provenance"]["date"] and saved["provenance"]["device"]
    if name == "repro_stochastic_liprune":  # Eq. 2's gate by default, the ungated form beside it
        assert saved["gate"] is True and "| 0.3 | stochastic liprune, ungated |" in text
        assert "| 0.3 | stochastic liprune |" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert "Claims" in capsys.readouterr().out

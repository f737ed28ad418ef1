"""``mace_sparse quickstart`` (README's main job) runs the real mace_run_train on the bundled data."""

from __future__ import annotations

import json
import subprocess

import torch


def test_quickstart_with_given_foundation(tmp_path, tiny_foundation):
    proc = subprocess.run(
        ["mace_sparse", "quickstart", "--work-dir", str(tmp_path), "--foundation_model", str(tiny_foundation),
         "--max_num_epochs", "2"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    model = torch.load(summary["model"], map_location="cpu", weights_only=False)
    assert type(model).__module__.startswith("mace.")
    assert 0.0 <= summary["unchanged_fraction_of_adapted_weights"] <= 1.0
    assert "--finetune-method sparse_str" in proc.stdout  # the command is shown to the user

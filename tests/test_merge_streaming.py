"""Merges stream tensor by tensor: peak memory follows the largest tensor, not the model size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.tiny_models import make_tiny_llama, make_variant

MERGE_AND_REPORT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import torch
    from workers.merge.config import load_merge_config
    from workers.merge.executor import merge_models

    root = Path(sys.argv[1])
    config = load_merge_config(sys.argv[2])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (root / "out").mkdir()
    merge_models(config, {r: Path(r) for r in config.input_models}, root / "out", device=torch.device("cpu"))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kb": after - before}))
    """
)


def peak_growth_mb(root, layers: int) -> float:
    """Peak RSS added by a 3-model TIES merge of models with `layers` layers (fresh process)."""
    make_tiny_llama(
        root / "base",
        seed=0,
        num_hidden_layers=layers,
        hidden_size=256,
        intermediate_size=1024,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    make_variant(root / "base", root / "a", seed=1, scale=0.01)
    make_variant(root / "base", root / "b", seed=2, scale=0.01)
    recipe = (
        f"merge_method: ties\nbase_model: {root / 'base'}\nmodels:\n"
        f"  - model: {root / 'a'}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {root / 'b'}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", MERGE_AND_REPORT, str(root), recipe],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_kb"] / 1024


def test_peak_memory_stays_flat_when_the_model_grows_8x(tmp_path):
    small = peak_growth_mb(tmp_path / "small", layers=2)
    large = peak_growth_mb(tmp_path / "large", layers=16)  # 3 x ~50 MB of inputs, tensors of 1 MB
    model_mb = (tmp_path / "large" / "base" / "model.safetensors").stat().st_size / 2**20
    assert large < 0.25 * 3 * model_mb, (small, large, model_mb)
    assert large < small + 0.25 * model_mb, (small, large, model_mb)

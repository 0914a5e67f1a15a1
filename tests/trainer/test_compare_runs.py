"""`megatron-vlm report --compare`: one figure for several runs; a third panel with the engine vs
trainer KL when the runs logged the weight-sync check (the drift recipe's comparison)."""
import json

from PIL import Image

from megatron_vlm.report import compare_runs


def _run(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_comparison_adds_the_mismatch_panel_only_when_logged(tmp_path):
    steps = [{"stage": "grpo", "step": i, "reward": 0.1 * i, **({"eval_accuracy": 0.2 + 0.01 * i} if i % 5 == 0 else {})}
             for i in range(1, 11)]
    a = _run(tmp_path / "a", [{"stage": "init"}] + steps)
    b = _run(tmp_path / "b", [{"stage": "init"}] + [dict(r, sync_logprob_kl=1e-4 * r["step"]) for r in steps])
    compare_runs([a, a], tmp_path / "two.png")
    compare_runs([a, b], tmp_path / "three.png")
    two, three = Image.open(tmp_path / "two.png"), Image.open(tmp_path / "three.png")
    assert two.size[1] == three.size[1] and three.size[0] > 1.4 * two.size[0]  # 19 in against 13

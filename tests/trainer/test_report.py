"""Rollouts you can look at and the run's page (trainer/samples.py, megatron_vlm/report): a short
digits run (2 gloo ranks, EP=2: SFT, then GRPO writing its samples every step) and
`megatron-vlm report` on it, opened in a real headless browser (Debian's chromium): the page shows
the run's curves and every sampled rollout with its image, and the reward filter hides what it
should."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from megatron_vlm.data.digits import DigitsConfig, build_demo_assets

    root = tmp_path_factory.mktemp("report")
    build_demo_assets(root / "assets", 0, DigitsConfig(seed=0, num_sft=16, num_rl=16, num_eval=8, num_pref=4, num_text=4))
    out = root / "run"
    command = [sys.executable, "-m", "megatron_vlm.cli", "train", "--config", str(ROOT / "configs" / "digits_demo.yaml"),
               f"vlm.assets={root / 'assets'}", "vlm.build_demo_assets=false", f"train.out_dir={out}",
               "stages=[{kind: sft, steps: 2, batch_size: 8}, {kind: grpo, steps: 2}]", "rollout.prompts_per_step=4",
               "rollout.n=4", "rollout.max_new_tokens=8", "update.micro_batch_size=8", "eval.samples=8",
               "eval.max_new_tokens=8", "train.samples.every=1", "train.samples.count=6", "vlm.export=false",
               # a reward that varies for a random policy (the demo's strict format would score it all 0)
               "reward={verifiers: {digits: 'tests.trainer.resume_rewards:shaped'}, strict_format: {digits: false}, "
               "num_workers: 1}"]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return out


@pytest.mark.dist
@pytest.mark.slow
def test_grpo_writes_readable_samples(run_dir):
    files = sorted(p.name for p in (run_dir / "samples").glob("step_*.jsonl"))
    assert files == ["step_0000003.jsonl", "step_0000004.jsonl"]  # the run's steps 3, 4: GRPO's 1, 2
    rows = [json.loads(line) for line in (run_dir / "samples" / files[0]).read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert row["task"] == "digits" and row["prompt"] and isinstance(row["response"], str)
        assert row["images"] and all((run_dir / "samples" / name).is_file() for name in row["images"])
        assert 0 <= row["reward"] <= 1 and row["verdict"] in ("correct", "wrong", "failed")
        assert row["response_length"] <= 8 and isinstance(row["truncated"], bool)
        assert isinstance(row["advantage"], float)


def _report(run_dir) -> Path:
    result = subprocess.run([sys.executable, "-m", "megatron_vlm.cli", "report", str(run_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return run_dir / "report.html"


@pytest.mark.dist
@pytest.mark.slow
def test_the_report_page_is_self_contained(run_dir):
    page = _report(run_dir).read_text()
    assert page.count("<tr data-reward=") == 12
    assert "data:image/png;base64," in page and 'src="images/' not in page  # images inline, no side files
    assert "held-out accuracy" in page and "grpo (2 steps)" in page
    assert re.search(r"by kind at the end: difference [\d.]+% \(strict [\d.]+%\), max [\d.]+% \(strict", page)


def _dom(url: str) -> str:
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                             "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_the_report_in_a_headless_browser(run_dir, tmp_path):
    page = _report(run_dir)
    rewards = [float(r) for r in re.findall(r'data-reward="([^"]+)"', page.read_text())]
    dom = _dom(page.as_uri())
    assert f'<span id="shown">{len(rewards)}</span>' in dom
    threshold = sorted(rewards)[len(rewards) // 2]
    dom = _dom(f"{page.as_uri()}?min={threshold}")  # the filter, applied by the page's script
    expected = sum(r >= threshold for r in rewards)
    assert 0 < expected < len(rewards)
    assert f'<span id="shown">{expected}</span>' in dom
    assert dom.count('style="display: none;"') == len(rewards) - expected
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("REPORT_SCREENSHOT"):  # a copy of the screenshot, to look at
        shutil.copy(shot, os.environ["REPORT_SCREENSHOT"])

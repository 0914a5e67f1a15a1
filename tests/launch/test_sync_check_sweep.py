"""launch/sync_check_sweep.py's table: each case against its regime's defaults (fp32 trainer ->
bfloat16_engine, bf16 trainer -> bfloat16), the worst healthy case and the mildest stale case each
bound sees. The sweep itself runs the real engine for ~6 min and is not part of the suite; its
figures are in docs/sync_check_sweep.md."""
import importlib.util
from pathlib import Path

from megatron_vlm.rollout.weight_sync import SYNC_CHECK_DEFAULTS

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("sync_check_sweep", ROOT / "launch" / "sync_check_sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def case(name, trainer, mean, bulk, seed=5):
    return dict(case=name, seed=seed, trainer=trainer, tokens=784, max_abs=0.03, mean_abs=mean,
                quantile_abs=0.01, kl=2 * bulk, bulk_kl=bulk)


def test_cases_are_held_against_their_regimes_bounds():
    bounds = SYNC_CHECK_DEFAULTS["bfloat16"]
    cases = [case("healthy, weights 0", "fp32", 2e-3, 4e-6), case("healthy, weights 0", "bf16", 2.5e-3, 5e-6),
             case("stale bucket 0: embed", "fp32", 2 * bounds["mean_abs"], 10 * bounds["bulk_kl"]),
             case("stale bucket 2: gate_up", "bf16", 2.4e-3, 0.5 * bounds["bulk_kl"])]
    text = sweep.table(cases)
    lines = text.splitlines()
    assert lines[0].startswith("| case | trainer | tokens | mean | p99 | KL | bulk KL | max |")
    assert lines[2].endswith("| - |") and lines[3].endswith("| - |")  # healthy: under every bound
    assert lines[4].endswith("| mean_abs, kl, bulk_kl |")  # the stale embedding: over three bounds
    assert lines[5].endswith("| - |")  # a stale bucket within rounding passes: no statistic sees it
    assert "bulk_kl: healthy worst 5e-06, bound 1.2e-05, stale cases over it 1 of 2 (mildest 0.00012)" in text
    assert "kl: healthy worst 1e-05, bound 0.0002, stale cases over it 1 of 2" in text


def test_without_an_output_folder_it_prints_its_usage(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert sweep.main([]) == 2
    assert "launch/sync_check_sweep.py /tmp/sync_sweep" in capsys.readouterr().out

"""benchmarks/cpu_speed.py: every setting measured in its own process, the table and the pick."""
import json

from conftest import run_script


def test_cpu_speed_measures_each_setting_and_picks_one_that_fits(tmp_path):
    out = tmp_path / "speed.json"
    res = run_script("benchmarks/cpu_speed.py", "--image-size", "32", "--steps", "1", "--models", "sample_resnet",
                     "--precisions", "fp32", "--no-compile", "--json", out, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["precision"], r["micro"], r["compile"]) for r in rows] == [("fp32", None, False), ("fp32", 64, False),
                                                                          ("fp32", 32, False)]
    assert all(r["img_s"] > 0 and 0 < r["peak_rss_gb"] < result["memory_limit_gb"] for r in rows)
    pick = result["picks"]["sample_resnet"]
    assert pick["img_s"] == max(r["img_s"] for r in rows)
    md = (tmp_path / "speed.md").read_text()
    assert "| sample_resnet | fp32, micro 32, eager |" in md and "1.00×" in md


def test_cpu_speed_reports_a_failed_setting_in_its_row():
    import sys
    from conftest import ROOT
    sys.path.insert(0, f"{ROOT}/benchmarks")
    import cpu_speed
    bad = cpu_speed.measure(dict(model="sample_resnet", precision="fp32", micro=None, compile=False, image_size=0,
                                 batch=4, steps=1, warmup=0), timeout=120)
    assert "error" in bad and bad["error"]


def test_the_whole_batch_is_compiled_beside_the_fastest_eager_setting():
    import sys
    from conftest import ROOT
    sys.path.insert(0, f"{ROOT}/benchmarks")
    import cpu_speed

    def row(precision, micro, img_s, gb):
        return dict(model="m", precision=precision, micro=micro, compile=False, img_s=img_s, peak_rss_gb=gb)
    # the Dec-06 Xeon's sample_resnet: bf16 in micro-batches of 64 was the fastest eager setting
    rows = [row("fp32", None, 25.8, 6.9), row("bf16", None, 30.6, 4.2), row("bf16", 64, 36.1, 2.6),
            row("bf16", 32, 24.5, 1.9)]
    assert cpu_speed.compiled_settings(rows, 7.8) == [dict(model="m", precision="bf16", micro=64, compile=True),
                                                      dict(model="m", precision="bf16", micro=None, compile=True)]
    # a whole batch that does not fit is not compiled either; one that already won is compiled once
    assert cpu_speed.compiled_settings(rows, 3.0) == [dict(model="m", precision="bf16", micro=64, compile=True)]
    assert cpu_speed.compiled_settings(rows[:2], 7.8) == [dict(model="m", precision="bf16", micro=None, compile=True)]
    assert cpu_speed.compiled_settings([{**rows[0], "error": "x"}], 7.8) == []

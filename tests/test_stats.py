"""Issue 32: which differences are real. stats.py's figures against cases computed by hand, the
predictions file (report.save_predictions / read_predictions) against any bytes, and compare.py's
tables from predictions files alone (no training, no checkpoint)."""
import json
import math
import os
import random
import re
import zipfile

import numpy as np
import pytest

import compare
import report
import stats
from utils import UserError, run_cli

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


# ----------------------------------------------------------------------------------------------
# stats.py against hand-computed cases


def test_wilson_interval_by_hand():
    k, n = 8, 10
    p = k / n
    center = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 / (1 + Z95 ** 2 / n) * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n ** 2))
    low, high = stats.wilson_interval(k, n)
    assert (low, high) == pytest.approx((center - half, center + half), abs=1e-9)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    # at the edge the interval stays inside [0, 1] and is not empty (a Wald interval would be [1, 1])
    low, high = stats.wilson_interval(10_000, 10_000)
    assert high == pytest.approx(1.0) and 0.999 < low < 1.0


def test_mcnemar_exact_by_hand():
    # 1 image only A gets right, 6 only B: under H0 each is A's with p 1/2;
    # two-sided p = 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * (1 + 7) / 128
    assert stats.mcnemar_exact(1, 6) == pytest.approx(16 / 128)
    assert stats.mcnemar_exact(6, 1) == pytest.approx(16 / 128)
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert stats.mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_paired_counts_and_delta():
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    b = np.array([1, 0, 0, 0, 1, 1, 0, 1], dtype=bool)
    t = stats.paired(a, b)
    assert (t.n, t.only_a, t.only_b) == (8, 2, 1)
    assert t.delta == pytest.approx((5 - 4) / 8)
    assert t.p_value == pytest.approx(1.0)  # 2 * P(X <= 1 | Bin(3, 1/2)) = 2 * 4 / 8
    with pytest.raises(ValueError):
        stats.paired(a, b[:7])


def test_paired_bootstrap_interval_matches_the_normal_approximation():
    """10,000 images, A right on 100 images B gets wrong and nowhere else different: the per-image
    difference has mean 0.01 and sd sqrt(0.01 * 0.99), so the 95% interval is 0.01 ± 1.96 * sd / 100."""
    a = np.ones(10_000, dtype=bool)
    b = a.copy()
    b[:100] = False
    low, high = stats.paired_bootstrap_interval(a, b)
    half = Z95 * math.sqrt(0.01 * 0.99) / 100
    assert low == pytest.approx(0.01 - half, abs=0.15 * half) and high == pytest.approx(0.01 + half, abs=0.15 * half)
    assert stats.paired_bootstrap_interval(a, b) == (low, high)  # a fixed seed: the same table every time
    # no difference anywhere: the interval is the point, not NaN
    assert stats.paired_bootstrap_interval(a, a) == (0.0, 0.0)


def test_the_bootstrap_pairs_the_images():
    """Two runs that disagree on few images: the paired interval is narrow, far narrower than the
    unpaired interval of two independent accuracies (which resampling each run alone would give)."""
    rng = np.random.default_rng(1)
    a = rng.random(10_000) < 0.9
    b = a.copy()
    flip = rng.choice(10_000, 40, replace=False)
    b[flip] = ~b[flip]
    low, high = stats.paired_bootstrap_interval(a, b)
    unpaired_half = Z95 * math.sqrt(2 * 0.9 * 0.1 / 10_000)
    assert (high - low) / 2 < 0.4 * unpaired_half


def test_paired_t_over_matching_seeds_by_hand():
    """Seeds 0, 1, 2 on both sides: differences 0.01, 0.02, 0.01; mean 1/75, sd 0.01/sqrt(3),
    t = 4 with 2 degrees of freedom, whose CDF is 1/2 + t / (2 sqrt(2 + t^2)): p = 1 - 4/sqrt(18)."""
    d = stats.group_difference([0.90, 0.92, 0.91], [0.89, 0.90, 0.90], seeds_a=[0, 1, 2], seeds_b=[0, 1, 2])
    assert d.test == "paired t (3 seeds)"
    assert d.delta == pytest.approx(0.04 / 3)
    assert d.p_value == pytest.approx(1 - 4 / math.sqrt(18), abs=1e-9)
    # the seeds are matched by number, not by position
    d2 = stats.group_difference([0.91, 0.90, 0.92], [0.89, 0.90, 0.90], seeds_a=[2, 0, 1], seeds_b=[0, 1, 2])
    assert d2.p_value == pytest.approx(d.p_value)


def test_welch_t_by_hand():
    """Unequal seeds, sizes and variances: Welch's t and Welch-Satterthwaite's degrees of freedom
    (a pooled-variance t-test gives another p)."""
    from scipy.stats import t as student
    a, b = np.array([0.90, 0.93, 0.96, 0.91]), np.array([0.899, 0.900, 0.901])
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    d = stats.group_difference(list(a), list(b), seeds_a=[0, 1, 2, 3], seeds_b=[0, 1, 2])
    assert d.test == "Welch t"
    assert d.p_value == pytest.approx(2 * student.sf(abs(t), df), rel=1e-9)
    half = student.ppf(0.975, df) * math.sqrt(va + vb)
    assert d.ci == pytest.approx((a.mean() - b.mean() - half, a.mean() - b.mean() + half), rel=1e-9)
    assert stats.group_difference([0.9], [0.8, 0.7]) is None  # one run is no spread


def test_spread_and_words():
    s = stats.spread([0.96, 0.97, 0.95])
    assert (s.n, s.mean, s.low, s.high) == (3, pytest.approx(0.96), 0.95, 0.97)
    assert s.std == pytest.approx(0.01)
    words = stats.verdict("resnet_att_scratch", "resnet_scratch", -0.0015, (-0.0042, 0.0012), 0.29)
    assert words == ("resnet_att_scratch vs resnet_scratch: -0.15 points, 95% CI [-0.42, +0.12], p = 0.29: "
                     "no evidence of a difference")
    assert stats.verdict("a", "b", -0.01, (-0.015, -0.005), 0.001).endswith("p = 0.001: b is better than a")
    assert stats.verdict("a", "b", 0.01, (0.005, 0.015), 1e-9).endswith("p < 0.0001: a is better than b")


def test_expected_calibration_error_by_hand():
    """Four images, 15 bins: top probabilities 0.9 (right), 0.9 (wrong), 0.62 (right), 0.3 (right)
    fall in bins (0.867, 0.933], (0.6, 0.667] and (0.267, 0.333]:
    ECE = 2/4 |0.5 - 0.9| + 1/4 |1 - 0.62| + 1/4 |1 - 0.3| = 0.2 + 0.095 + 0.175."""
    def row(top, cls):
        p = np.full(10, (1 - top) / 9)
        p[cls] = top
        return p
    probs = np.stack([row(0.9, 3), row(0.9, 4), row(0.62, 0), row(0.3, 9)])
    labels = np.array([3, 5, 0, 9])
    cal = stats.calibration(probs, labels)
    assert cal.ece == pytest.approx(0.47)
    assert cal.count.sum() == 4 and cal.count[13] == 2 and cal.count[9] == 1 and cal.count[4] == 1
    assert cal.accuracy[13] == 0.5 and cal.confidence[13] == pytest.approx(0.9)
    # a perfectly calibrated case: each bin's accuracy is its confidence
    probs = np.stack([row(0.5, 0)] * 4)
    assert stats.calibration(probs, np.array([0, 0, 1, 2])).ece == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------
# The predictions file


def fake_predictions(n=200, seed=0, acc=0.8, classes=10, indices=None, settings=None, run="run"):
    """(probs, labels, indices, meta) of a run right on about ``acc`` of n images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    right = rng.random(n) < acc
    predicted = np.where(right, labels, (labels + rng.integers(1, classes, n)) % classes)
    probs = rng.dirichlet(np.ones(classes), n) * 0.4
    probs[np.arange(n), predicted] += 0.6
    meta = report.predictions_meta("cifar10", [f"c{i}" for i in range(classes)],
                                   dict(settings or {"model": "resnet", "epochs": 1}, seed=seed), run, "X.pth", 1,
                                   0.5, right.mean())
    meta["settings"] = dict(settings or {"model": "resnet", "epochs": 1})
    return probs, labels, np.arange(n) if indices is None else indices, meta


def test_predictions_round_trip(tmp_path):
    probs, labels, indices, meta = fake_predictions()
    path = str(tmp_path / "p.npz")
    report.save_predictions(path, probs, labels, indices, meta)
    got = report.read_predictions(path)
    assert np.array_equal(got["labels"], labels) and np.array_equal(got["indices"], indices)
    np.testing.assert_allclose(got["probs"], probs, atol=1e-3)
    assert np.array_equal(got["correct"], probs.argmax(1) == labels)
    assert got["meta"]["run"] == "run" and got["meta"]["format"] == report.PREDICTIONS_FORMAT
    assert os.listdir(tmp_path) == ["p.npz"]  # no temporary file left
    assert os.path.getsize(path) < 20_000  # float16, compressed: small enough to commit with a results row


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    probs, labels, indices, meta = fake_predictions()
    path = str(tmp_path / "p.npz")
    report.save_predictions(path, probs, labels, indices, meta)
    before = open(path, "rb").read()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez_compressed", full)
    with pytest.raises(UserError, match="No space left on device"):
        report.save_predictions(path, probs, labels, indices, dict(meta, run="other"))
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["p.npz"]


def rewrite(path, **arrays):
    """A valid file with some arrays replaced (numpy's own writer: only the contents are wrong)."""
    with np.load(path) as z:
        fields = {k: z[k] for k in z.files}
    fields.update(arrays)
    np.savez(path, **fields)


def test_predictions_that_lie_are_refused(tmp_path):
    probs, labels, indices, meta = fake_predictions()
    good = str(tmp_path / "good.npz")
    report.save_predictions(good, probs, labels, indices, meta)
    meta_of = lambda **kw: np.array(json.dumps(dict(meta, format=1, **kw)))
    cases = {
        "labels out of range": dict(labels=np.full(len(labels), 10, dtype=np.int64)),
        "repeated indices": dict(indices=np.zeros(len(labels), dtype=np.int64)),
        "short probabilities": dict(probs=probs[:10].astype(np.float16)),
        "not probabilities": dict(probs=(probs * 3).astype(np.float16)),
        "NaN": dict(probs=np.full_like(probs, np.nan, dtype=np.float16)),
        "float64": dict(probs=probs),
        "predicted not the most probable": dict(predicted=(probs.argmax(1) + 1) % 10),
        "predicted int8": dict(predicted=probs.argmax(1).astype(np.int8)),
        "no classes": dict(meta=meta_of(classes="airplane")),
        "another format": dict(meta=np.array(json.dumps(dict(meta, format=99)))),
        "meta not JSON": dict(meta=np.array("{not json")),
        "an object array": dict(meta=np.array([{"a": 1}], dtype=object)),
        "an extra array": dict(extra=np.zeros(3)),
    }
    for what, arrays in cases.items():
        path = str(tmp_path / "bad.npz")
        import shutil
        shutil.copy(good, path)
        rewrite(path, **arrays)
        with pytest.raises(UserError, match="not a predictions file of this project") as e:
            report.read_predictions(path)
        assert "\n" not in str(e.value), what


def test_predictions_fuzz_any_bytes_is_one_line(tmp_path):
    """Random bytes, truncations, byte flips and splices of a real file: read_predictions either
    reads a valid file or raises one UserError line; never another exception."""
    probs, labels, indices, meta = fake_predictions()
    good = str(tmp_path / "good.npz")
    report.save_predictions(good, probs, labels, indices, meta)
    raw = open(good, "rb").read()
    rng = random.Random(0)
    path = str(tmp_path / "case.npz")
    read_back = 0
    for i in range(300):
        kind = i % 4
        if kind == 0:
            data = rng.randbytes(rng.randint(0, 3000))
        elif kind == 1:
            data = raw[:rng.randrange(len(raw))]
        elif kind == 2:
            data = bytearray(raw)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        else:
            cut = rng.randrange(len(raw))
            data = raw[:cut] + rng.randbytes(rng.randint(1, 200)) + raw[cut:]
        with open(path, "wb") as f:
            f.write(data)
        try:
            got = report.read_predictions(path)
            read_back += 1
            assert got["probs"].shape == (len(got["labels"]), len(got["meta"]["classes"]))
        except UserError as e:
            assert "\n" not in str(e) and str(e).startswith(path), str(e)
    assert read_back < 300


def test_a_zip_bomb_is_refused_before_it_is_read(tmp_path):
    path = str(tmp_path / "bomb.npz")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name in ("probs.npy", "predicted.npy", "labels.npy", "indices.npy"):
            z.writestr(name, b"")
        z.writestr("meta.npy", b"\0" * (report.MAX_PREDICTIONS_BYTES + 1))
    with pytest.raises(UserError, match="bytes uncompressed"):
        report.read_predictions(path)


# ----------------------------------------------------------------------------------------------
# compare.py from predictions files


def write_run(folder, name, probs, labels, indices, meta, test_acc):
    """A run as train.py leaves it in its log folder: the CSV, the log's lines compare.py reads,
    and the predictions beside them; no checkpoint."""
    base = os.path.join(folder, name)
    report.append_csv(base + ".csv", report.epoch_row(1, 1.0, 0.5, 0.1, 10.0, 1000, (1.0, 0.5)))
    with open(base + ".log", "w") as f:
        f.write(f"run {name}: {meta['settings']['model']}, 20,490 trainable of 23,528,522 parameters, cpu fp32, "
                f"image size 32, batch 128, adamw lr 0.001, 1 epochs\n"
                f"checkpoints: gone/{name}/ (last.pth, ResNet.pth); log: {base}.log/.csv/.png\n"
                f"Test Acc : {test_acc:.4f}\n")
    report.save_predictions(report.predictions_path(base), probs, labels, indices, dict(meta, run=name))
    return base + ".csv"


def runs_on_one_test_set(folder):
    """Two settings x three seeds on the same 2,000 images: "att" better than "lin" by ~5 points,
    one more run on other images."""
    n, paths = 2000, {}
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 10, n)
    for setting, acc in (("lin", 0.85), ("att", 0.90)):
        for seed in (0, 1, 2):
            right = rng.random(n) < acc
            probs = np.full((n, 10), 0.02)
            predicted = np.where(right, labels, (labels + 1) % 10)
            probs[np.arange(n), predicted] = 0.82
            meta = report.predictions_meta("cifar10", [f"c{i}" for i in range(10)],
                                           {"model": "resnet_att" if setting == "att" else "resnet", "seed": seed,
                                            "epochs": 1}, "", "X.pth", 1, 0.5, right.mean())
            paths[(setting, seed)] = write_run(folder, f"{setting}-seed{seed}", probs, labels, np.arange(n), meta,
                                               right.mean())
    probs, other_labels, _, meta = fake_predictions(n=500, seed=9)
    paths["other"] = write_run(folder, "other-images", probs, other_labels, np.arange(500) * 3, meta, 0.8)
    probs, _, _, meta = fake_predictions(n=n, seed=10)  # as many images, other ones (another subset seed)
    paths["shifted"] = write_run(folder, "shifted", probs, labels, np.arange(n) + 1, meta, 0.8)
    return paths


def test_compare_tells_which_differences_are_real(tmp_path, capsys):
    paths = runs_on_one_test_set(str(tmp_path))
    argv = [paths[k] for k in [("lin", 0), ("att", 0), ("lin", 1), ("att", 1), ("lin", 2), ("att", 2), "other",
                               "shifted"]]
    assert compare.main(argv) == 0
    out, err = capsys.readouterr()
    preds = {k: report.read_predictions(report.predictions_path(p[:-4])) for k, p in paths.items()}

    # every run: its accuracy with the Wilson interval of its own predictions
    for key in [("lin", 0), ("att", 2)]:
        c = preds[key]["correct"]
        low, high = stats.wilson_interval(c.sum(), len(c))
        name = f"{key[0]}-seed{key[1]}"
        row = [ln for ln in out.splitlines() if ln.startswith(f"| {name} |")][0]
        assert f"| [{low:.4f}, {high:.4f}] (2,000 images) |" in row

    # every pair on the same images: McNemar and the bootstrap, the numbers stats.paired gives
    t = stats.paired(preds[("lin", 0)]["correct"], preds[("att", 0)]["correct"])
    pair = [ln for ln in out.splitlines() if ln.startswith("| lin-seed0 | att-seed0 |")]
    assert len(pair) == 1
    assert pair[0] == (f"| lin-seed0 | att-seed0 | 2,000 | {100 * t.delta:+.2f} | {t.only_a:,} | {t.only_b:,} | "
                       f"{stats.format_p(t.p_value)} | [{100 * t.ci[0]:+.2f}, {100 * t.ci[1]:+.2f}] |")
    pair_rows = lambda text: [ln for ln in text.splitlines() if re.match(r"\| (lin|att)-seed\d \| (lin|att)-seed\d \|", ln)]
    # by default the two settings' runs of the same seed (seeds of one setting: their spread)
    assert [ln.split(" | ")[:2] for ln in pair_rows(out)] == [["| lin-seed0", "att-seed0"], ["| lin-seed1", "att-seed1"],
                                                              ["| lin-seed2", "att-seed2"]]
    # the run on other images: refused for the paired tests, one line per pair, saying why
    refused = [ln for ln in err.splitlines() if "other-images: no paired test" in ln]
    assert len(refused) == 6 and all("not tested on the same images (2,000 against 500" in ln for ln in refused)
    refused = [ln for ln in err.splitlines() if "-seed" in ln and "vs shifted: no paired test" in ln]
    assert len(refused) == 6 and all("(other test images" in ln for ln in refused), refused

    # three seeds a setting: n, mean ± std, min-max; and the paired t-test over the shared seeds
    accs = {s: [preds[(s, k)]["correct"].mean() for k in (0, 1, 2)] for s in ("lin", "att")}
    spread = stats.spread(accs["att"])
    assert f"| resnet_att | 3 | {spread.mean:.4f} ± {spread.std:.4f} | {spread.low:.4f}–{spread.high:.4f} | 0, 1, 2 |" \
        in out
    d = stats.group_difference(accs["lin"], accs["att"], [0, 1, 2], [0, 1, 2])
    assert (f"| resnet (n=3) | resnet_att (n=3) | paired t (3 seeds) | {100 * d.delta:+.2f} | "
            f"[{100 * d.ci[0]:+.2f}, {100 * d.ci[1]:+.2f}] | {stats.format_p(d.p_value)} |") in out
    # and in words
    assert "- " + stats.verdict("lin-seed0", "att-seed0", t.delta, t.ci, t.p_value) in out.splitlines()
    assert "resnet_att (n=3) is better than resnet (n=3)" in out
    # --all-pairs: the 15 pairs among the six runs
    assert compare.main(argv + ["--all-pairs"]) == 0
    assert len(pair_rows(capsys.readouterr()[0])) == 15


def test_compare_runs_without_predictions_still_table(tmp_path, capsys):
    paths = runs_on_one_test_set(str(tmp_path))
    os.remove(report.predictions_path(paths[("lin", 0)][:-4]))
    assert compare.main([paths[("lin", 0)], paths[("att", 0)]]) == 0
    out, err = capsys.readouterr()
    assert "lin-seed0: no predictions" in err and "Paired tests" not in out
    assert [ln for ln in out.splitlines() if ln.startswith("| lin-seed0 |")][0].split(" | ")[5] == compare.MISSING


def test_compare_reads_a_predictions_file_alone(tmp_path, capsys):
    probs, labels, indices, meta = fake_predictions(n=300, seed=1)
    a, b = str(tmp_path / "A-test.npz"), str(tmp_path / "B-test.npz")
    report.save_predictions(a, probs, labels, indices, dict(meta, run="ra", checkpoint="ra/ResNet.pth"))
    report.save_predictions(b, probs[::-1].copy(), labels, indices, dict(meta, run="rb", checkpoint="X.pth"))
    assert compare.main([a, b]) == 0
    out, _ = capsys.readouterr()
    assert "| ra/ResNet.pth | resnet |" in out and "| rb/X.pth | resnet |" in out
    assert "| ra/ResNet.pth | rb/X.pth | 300 |" in out


def test_compare_refuses_a_broken_predictions_file(tmp_path, capsys):
    paths = runs_on_one_test_set(str(tmp_path))
    with open(report.predictions_path(paths[("lin", 0)][:-4]), "wb") as f:
        f.write(os.urandom(500))
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: compare.main([paths[("lin", 0)]]))
    _, err = capsys.readouterr()
    errors = [ln for ln in err.splitlines() if "error:" in ln]  # before it, the warning that the checkpoint is gone
    assert e.value.code != 0 and len(errors) == 1 and "not a predictions file" in errors[0]
    assert "Traceback" not in err

"""How sure a comparison is: intervals and tests over test-set predictions, through scipy.stats.

Every figure here is about the test set of one data set, image by image (report.read_predictions):
* one run: its accuracy with a 95% Wilson interval (the binomial interval that stays inside [0, 1]);
* two runs on the same images: the change in accuracy, the images only one of them gets right
  (the discordant pairs), McNemar's exact test on them (Dietterich 1998's recommendation for two
  classifiers on one test set), and a paired bootstrap interval of the change;
* several seeds of one setting: n, mean ± std, min-max; two such groups: Welch's t-test on their
  accuracies, or the paired t-test of per-seed differences when both have the same seeds;
* calibration: the expected calibration error over equal-width confidence bins (Guo et al. 2017).
"""
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same predictions give the same interval, so tables can be re-run
ECE_BINS = 15  # Guo et al. (2017); torchmetrics' CalibrationError default too
SIGNIFICANCE = 0.05  # the level the words of ``verdict`` use


# ----------------------------------------------------------------------------------------------
# One run


def wilson_interval(correct, n, confidence=CONFIDENCE):
    """(low, high) of the accuracy ``correct`` / ``n``: the Wilson score interval."""
    ci = stats.binomtest(int(correct), int(n)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


# ----------------------------------------------------------------------------------------------
# Two runs on the same images


@dataclass
class Paired:
    """Run A against run B on the same n images (accuracies as fractions)."""
    n: int
    acc_a: float
    acc_b: float
    only_a: int  # images A gets right and B wrong
    only_b: int  # images B gets right and A wrong
    p_value: float  # McNemar's exact test (two-sided)
    ci: tuple  # paired bootstrap interval of acc_a - acc_b

    @property
    def delta(self):
        return self.acc_a - self.acc_b


def mcnemar_exact(only_a, only_b):
    """McNemar's exact test: under "no difference" each discordant image is A's or B's with
    probability 1/2, so only_a ~ Binomial(only_a + only_b, 1/2). Two-sided p-value; 1 when no
    image is discordant."""
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(int(only_a), int(only_a + only_b), 0.5).pvalue)


def paired_bootstrap_interval(correct_a, correct_b, confidence=CONFIDENCE, resamples=BOOTSTRAP_RESAMPLES,
                              seed=BOOTSTRAP_SEED):
    """Percentile interval of accuracy(A) - accuracy(B) over images resampled with replacement,
    the same images for both runs (the pairing): the mean of the per-image differences."""
    diff = np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)
    if np.all(diff == diff[0]):  # no spread to resample (scipy would warn and return NaN)
        return float(diff[0]), float(diff[0])
    result = stats.bootstrap((diff,), np.mean, n_resamples=resamples, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed), batch=1000)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired(correct_a, correct_b):
    """Paired comparison of two runs' per-image correctness (bool arrays, the same images in the
    same order)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired runs need the same images: {a.shape} against {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return Paired(len(a), float(a.mean()), float(b.mean()), only_a, only_b, mcnemar_exact(only_a, only_b),
                  paired_bootstrap_interval(a, b))


# ----------------------------------------------------------------------------------------------
# Seeds


@dataclass
class Spread:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for one run
    low: float
    high: float


def spread(values):
    v = np.asarray(values, dtype=np.float64)
    return Spread(len(v), float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, float(v.min()), float(v.max()))


@dataclass
class GroupDifference:
    test: str  # "paired t (seeds k)" or "Welch t"
    delta: float  # mean of A - mean of B
    ci: tuple
    p_value: float


def group_difference(accs_a, accs_b, seeds_a=None, seeds_b=None, confidence=CONFIDENCE):
    """Two groups of runs (each a setting over seeds): with the same seeds on both sides (two at
    least), the paired t-test of the per-seed differences (a seed's split, order and draws are
    shared); else Welch's t-test. Needs two runs a side; None otherwise."""
    if len(accs_a) < 2 or len(accs_b) < 2:
        return None
    if seeds_a is not None and seeds_b is not None and sorted(seeds_a) == sorted(seeds_b) \
            and len(set(seeds_a)) == len(seeds_a):
        by_seed_a, by_seed_b = dict(zip(seeds_a, accs_a)), dict(zip(seeds_b, accs_b))
        keys = sorted(by_seed_a)
        a, b = np.array([by_seed_a[k] for k in keys]), np.array([by_seed_b[k] for k in keys])
        if np.all(a - b == (a - b)[0]):  # no spread: t is undefined
            return GroupDifference(f"paired t ({len(keys)} seeds)", float((a - b)[0]), ((a - b)[0],) * 2,
                                   1.0 if (a - b)[0] == 0 else 0.0)
        result = stats.ttest_rel(a, b)
        test = f"paired t ({len(keys)} seeds)"
    else:
        a, b = np.asarray(accs_a, dtype=np.float64), np.asarray(accs_b, dtype=np.float64)
        if a.std() == 0 and b.std() == 0:
            d = float(a.mean() - b.mean())
            return GroupDifference("Welch t", d, (d, d), 1.0 if d == 0 else 0.0)
        result = stats.ttest_ind(a, b, equal_var=False)
        test = "Welch t"
    ci = result.confidence_interval(confidence)
    return GroupDifference(test, float(a.mean() - b.mean()), (float(ci.low), float(ci.high)), float(result.pvalue))


# ----------------------------------------------------------------------------------------------
# Words


def verdict(name_a, name_b, delta, ci, p_value):
    """One sentence a reader can act on, e.g. "resnet_att_scratch vs resnet_scratch: -0.15 points,
    95% CI [-0.42, +0.12], p = 0.29: no evidence of a difference"."""
    p_text = format_p(p_value)
    figures = (f"{name_a} vs {name_b}: {100 * delta:+.2f} points, {CONFIDENCE:.0%} CI "
               f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}], p {p_text if p_text.startswith('<') else '= ' + p_text}")
    if p_value >= SIGNIFICANCE:
        return figures + ": no evidence of a difference"
    better, worse = (name_a, name_b) if delta > 0 else (name_b, name_a)
    return figures + f": {better} is better than {worse}"


def format_p(p):
    return f"{p:.2g}" if p >= 1e-4 else "< 0.0001"


# ----------------------------------------------------------------------------------------------
# Calibration


@dataclass
class Calibration:
    ece: float
    edges: np.ndarray  # bins + 1 confidence edges
    confidence: np.ndarray  # per bin: mean confidence (NaN where empty)
    accuracy: np.ndarray  # per bin: accuracy (NaN where empty)
    count: np.ndarray  # per bin: images


def calibration(probs, labels, predicted=None, bins=ECE_BINS):
    """Expected calibration error: images binned by their top probability into ``bins`` equal-width
    bins over [0, 1] (a bin holds (low, high], the first [0, high]); ECE = sum over bins of
    (images in bin / all) * |accuracy - mean confidence|. ``predicted``: the classes the model
    predicted (default: the argmax of ``probs``)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence = probs.max(1)
    predicted = probs.argmax(1) if predicted is None else np.asarray(predicted)
    correct = (predicted == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, confidence, minlength=bins) / count
        acc = np.bincount(which, correct, minlength=bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] / len(labels) * np.abs(acc[filled] - conf[filled])))
    return Calibration(ece, edges, conf, acc, count)

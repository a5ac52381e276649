"""Calibration metrics against plain numpy references, temperature scaling, reliability diagrams."""
import numpy as np
import pytest
from scipy import special

from fm_adapt.evaluators import calibration, reliability


def _random(rng, n, k, sharpness=2.0):
  logits = sharpness * rng.normal(size=(n, k))
  return rng.integers(0, k, n), special.softmax(logits, axis=-1)


def _ref_ece(labels, probs, num_bins=15):
  conf, pred = probs.max(1), probs.argmax(1)
  total = 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    in_bin = (conf > lo) & (conf <= hi) | ((conf == 0) if b == 0 else False)
    if in_bin.any():
      total += in_bin.mean() * abs((pred[in_bin] == labels[in_bin]).mean() - conf[in_bin].mean())
  return total


def _ref_adaptive_ece(labels, probs, num_bins=15):
  conf, right = probs.max(1), probs.argmax(1) == labels
  order = np.argsort(conf, kind="stable")
  n, total, start = len(conf), 0.0, 0
  for b in range(num_bins):
    size = n // num_bins + (1 if b < n % num_bins else 0)
    group = order[start:start + size]
    start += size
    if size:
      total += size / n * abs(right[group].mean() - conf[group].mean())
  return total


@pytest.mark.parametrize("n,k,bins", [(1000, 2, 15), (777, 5, 15), (10, 3, 15), (500, 4, 7)])
def test_ece_both_kinds_match_numpy_references(n, k, bins):
  labels, probs = _random(np.random.default_rng(n + k), n, k)
  assert calibration.ece(labels, probs, bins) == pytest.approx(_ref_ece(labels, probs, bins),
                                                               abs=1e-12)
  assert calibration.adaptive_ece(labels, probs, bins) == pytest.approx(
      _ref_adaptive_ece(labels, probs, bins), abs=1e-12)


def test_ece_of_a_known_case():
  # Every confidence 0.9, 7 of 10 right: one bin, gap 0.2. Adaptive: same confidence everywhere,
  # 15 bins of sizes 1 or 0 -> the right/wrong split per example: mean |1 - .9| or |0 - .9|.
  probs = np.tile([0.9, 0.1], (10, 1))
  labels = np.array([0] * 7 + [1] * 3)
  assert calibration.ece(labels, probs) == pytest.approx(0.2, abs=1e-12)
  assert calibration.adaptive_ece(labels, probs) == pytest.approx((7 * 0.1 + 3 * 0.9) / 10)
  perfect = np.eye(3)[[0, 1, 2, 1]]
  assert calibration.ece(np.array([0, 1, 2, 1]), perfect) == 0.0


@pytest.mark.parametrize("k", [2, 6])
def test_nll_and_brier_match_numpy_references(k):
  labels, probs = _random(np.random.default_rng(k), 300, k)
  ref_nll = -np.mean([np.log(p[y]) for y, p in zip(labels, probs)])
  ref_brier = np.mean([sum((p[j] - (j == y)) ** 2 for j in range(k))
                       for y, p in zip(labels, probs)])
  assert calibration.nll(labels, probs) == pytest.approx(ref_nll, rel=1e-12)
  assert calibration.brier(labels, probs) == pytest.approx(ref_brier, rel=1e-12)
  if k == 2:  # The 2-class softmax convention: twice the binary (p - y)^2.
    assert calibration.brier(labels, probs) == pytest.approx(
        2 * np.mean((probs[:, 1] - labels) ** 2), rel=1e-12)


def test_nll_of_a_zero_probability_is_finite():
  assert calibration.nll(np.array([1]), np.array([[1.0, 0.0]])) == pytest.approx(-np.log(1e-12))


def _overconfident(rng, n, k=4):
  """Labels drawn from softmax(z); the model says softmax(3 z): right ranking, over-confident."""
  z = rng.normal(size=(n, k))
  labels = np.array([rng.choice(k, p=p) for p in special.softmax(z, axis=-1)])
  return labels, special.softmax(3 * z, axis=-1), special.softmax(z, axis=-1)


def test_temperature_scaling_fixes_an_overconfident_model():
  rng = np.random.default_rng(0)
  labels, probs, true_probs = _overconfident(rng, 4000)
  t = calibration.fit_temperature(labels, probs)
  assert 2.5 < t < 3.5  # T > 1 softens; the true factor is 3.
  scaled = calibration.apply_temperature(probs, t)
  assert calibration.nll(labels, scaled) < calibration.nll(labels, probs) - 0.1
  np.testing.assert_array_equal(scaled.argmax(1), probs.argmax(1))  # Accuracy unchanged.
  np.testing.assert_allclose(calibration.apply_temperature(probs, 3.0), true_probs, atol=1e-9)
  # On held-out data from the same model the fitted T lowers NLL and ECE too.
  test_labels, test_probs, _ = _overconfident(rng, 2000)
  metrics = calibration.calibration_metrics(test_labels, test_probs, labels, probs)
  assert metrics["temperature"] == pytest.approx(t)
  assert metrics["nll_ts"] < metrics["nll"] and metrics["ece_ts"] < metrics["ece"] / 2
  assert metrics["fit_nll_ts"] < metrics["fit_nll"]
  assert metrics["brier_ts"] < metrics["brier"]


def test_multilabel_is_calibrated_per_label_pooled():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, (50, 3))
  p = rng.uniform(0.01, 0.99, (50, 3))
  y, probs = calibration.as_multiclass(labels, p, "multilabel")
  assert probs.shape == (150, 2) and (y == labels.reshape(-1)).all()
  bce = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  assert calibration.nll(y, probs) == pytest.approx(bce, rel=1e-12)
  logit = np.log(p / (1 - p)).reshape(-1)
  np.testing.assert_allclose(calibration.apply_temperature(probs, 2.0)[:, 1],
                             special.expit(logit / 2.0), atol=1e-12)


def test_bad_inputs_are_clear_errors():
  with pytest.raises(ValueError, match=r"Split 'val': non-finite"):
    calibration.as_multiclass(np.array([0]), np.array([[np.nan, 1.0]]), "multiclass", "val")
  with pytest.raises(ValueError, match=r"labels must be 2 ints in \[0, 3\)"):
    calibration.as_multiclass(np.array([0, 3]), np.full((2, 3), 1 / 3), "multiclass")


def test_plot_reliability_writes_png_and_checks_its_input(tmp_path):
  rng = np.random.default_rng(0)
  conf = rng.uniform(0.3, 1.0, 200)
  right = rng.uniform(size=200) < conf
  path = reliability.plot_reliability([conf, conf ** 2], [right, right], tmp_path / "d" / "r.png",
                                      titles=["a", "b"])
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  reliability.plot_reliability(conf, right, tmp_path / "one.png")
  with pytest.raises(ValueError, match="same non-zero length"):
    reliability.plot_reliability(conf, right[:5], tmp_path / "bad.png")
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    reliability.plot_reliability(conf + 1, right, tmp_path / "bad.png")

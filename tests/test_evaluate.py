"""Evaluation: the importance-sampled log-likelihood where the truth is known, the
conversions by hand, chunking that changes nothing, and the evaluate command.

The reference model is linear-Gaussian: p(z) = N(0, I), p(x | z) = N(W z + b, c I),
so p(x) = N(b, W W^T + c I) exactly. Monte Carlo checks pass within _NUM_SIGMA
standard errors estimated from independent repeats; the keys are fixed.
"""

import functools
import importlib.util
import json
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import process_env
from PIL import Image

from vae_jax import (
  baselines,
  checkpointing,
  datasets,
  estimators,
  evaluate,
  input_pipeline,
  likelihoods,
  losses,
  models,
  objectives,
  train,
  trainer,
  writers,
)
from vae_jax import step as step_lib
from vae_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).parents[1]
_NUM_SIGMA = 4.0


# --------------------------------------------------------------------------
# A linear-Gaussian model with an exact marginal likelihood.


class _LinearGaussian:
  """p(x) = N(b, W W^T + c I); W has orthogonal columns, so the exact posterior
  N(mu, Sigma), Sigma = (I + W^T W / c)^-1, mu = Sigma W^T (x - b) / c, is diagonal.

  The encoder is affine in x: ``mean = (x - b) @ enc + shift``, ``logvar`` fixed.
  """

  c = 0.5

  def __init__(self, batch=4, latent=2, data=4):
    rng = np.random.default_rng(8)
    q, _ = np.linalg.qr(rng.normal(size=(data, latent)))
    self.w = q * np.array([1.5, 0.8])  # [data, latent]
    self.b = rng.normal(size=data)
    self.x = self.b + 1.5 * rng.normal(size=(batch, data))
    cov = self.w @ self.w.T + self.c * np.eye(data)
    r = self.x - self.b
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("bi,ij,bj->b", r, np.linalg.inv(cov), r)
    self.log_px = -0.5 * (data * math.log(2.0 * math.pi) + logdet + maha)
    self.sigma = np.diag(np.linalg.inv(np.eye(latent) + self.w.T @ self.w / self.c))
    self.enc = self.w * self.sigma / self.c  # [data, latent]: mu = (x - b) @ enc.
    self.model = models.from_encoder_decoder(
      None, self._encode, self._decode, latent, likelihoods.Gaussian(variance=self.c)
    )

  def params(self, shift_in_stds=0.0, var_factor=1.0):
    """An encoder off by ``shift_in_stds`` posterior stds, ``var_factor`` too wide."""
    f32 = functools.partial(np.asarray, dtype=np.float32)
    return {
      "w": f32(self.w.T),
      "b": f32(self.b),
      "enc": f32(self.enc),
      "shift": f32(shift_in_stds * np.sqrt(self.sigma)),
      "logvar": f32(np.log(self.sigma * var_factor)),
    }

  @staticmethod
  def _encode(params, x):
    mean = (x - params["b"][None]) @ params["enc"] + params["shift"][None]
    return mean, jnp.broadcast_to(params["logvar"][None], mean.shape)

  @staticmethod
  def _decode(params, z):
    return z @ params["w"] + params["b"][None]

  def analytic_elbo(self, params):
    """E_q[log p(x | z)] - KL(q || p) in closed form, float64."""
    mean, logvar = (np.asarray(a, np.float64) for a in self._encode(params, self.x))
    var = np.exp(logvar)
    resid = self.x - self.b - mean @ self.w.T
    trace = var @ np.sum(self.w**2, axis=0)
    data = self.x.shape[-1]
    rec = -0.5 * (data * math.log(2.0 * math.pi * self.c) + (np.sum(resid**2, -1) + trace) / self.c)
    kl = 0.5 * np.sum(var + mean**2 - 1.0 - logvar, -1)
    return rec - kl

  def estimates(self, params, num_samples, repeats, sample_chunk=500):
    """``repeats`` independent runs of the estimator: {name: [repeats, batch, ...]}."""
    fn = estimators.make_per_example_fn(
      self.model, num_samples=num_samples, sample_chunk=sample_chunk
    )
    x, idx = np.asarray(self.x, np.float32), np.arange(len(self.x), dtype=np.int32)
    runs = [fn(params, x, jax.random.key(r), idx) for r in range(repeats)]
    return {k: np.stack([np.asarray(r[k], np.float64) for r in runs]) for k in runs[0]}


@pytest.fixture(scope="module")
def linear_gaussian():
  return _LinearGaussian()


def test_exact_posterior_gives_exact_log_marginal_for_any_k(linear_gaussian):
  """With q = p(z | x) every weight is p(x): the estimate is exact, padding included."""
  m = linear_gaussian
  np.testing.assert_allclose(m.analytic_elbo(m.params()), m.log_px, rtol=1e-12)
  # K = 5 in chunks of 2: the last chunk is half padding, which must weigh nothing.
  out = m.estimates(m.params(), num_samples=5, repeats=2, sample_chunk=2)
  np.testing.assert_allclose(out["log_px"], np.broadcast_to(m.log_px, (2, 4)), rtol=1e-5)
  np.testing.assert_allclose(out["ess"], 5.0, rtol=1e-4)  # Equal weights: ESS = K.


def test_estimate_converges_to_exact_log_marginal(linear_gaussian):
  m = linear_gaussian
  params = m.params(shift_in_stds=1.0, var_factor=3.0)
  elbo = m.analytic_elbo(params)
  assert np.all(m.log_px - elbo > 1.0)  # A real gap for K to close.
  repeats = 16
  means, errors = [], []
  for k in (1, 10, 100, 5000):
    log_px = m.estimates(params, k, repeats)["log_px"]  # [repeats, batch]
    means.append(log_px.mean(0))
    errors.append(log_px.std(0, ddof=1) / math.sqrt(repeats))
  means, errors = np.array(means), np.array(errors)
  # The bound does not decrease as K grows (Burda et al.), up to Monte Carlo error.
  tol = _NUM_SIGMA * np.hypot(errors[1:], errors[:-1])
  assert np.all(means[1:] >= means[:-1] - tol), means
  # It stays below log p(x) and, at K = 5000, closes all but a few percent of the gap.
  assert np.all(means[-1] <= m.log_px + _NUM_SIGMA * errors[-1])
  assert np.all(m.log_px - means[-1] < 0.03 * (m.log_px - elbo)), (means[-1], m.log_px)
  assert np.all(means[-1] > elbo + 0.9 * (m.log_px - elbo))


def test_elbo_parts_match_closed_form(linear_gaussian):
  m = linear_gaussian
  params = m.params(shift_in_stds=1.0, var_factor=3.0)
  out = m.estimates(params, num_samples=1000, repeats=8)
  elbo = out["reconstruction"] - out["kl_per_dim"].sum(-1)  # [repeats, batch]
  error = elbo.std(0, ddof=1) / math.sqrt(elbo.shape[0])
  expected = m.analytic_elbo(params)
  assert np.all(np.abs(elbo.mean(0) - expected) < _NUM_SIGMA * error + 1e-4), (elbo, expected)
  assert np.all(elbo.mean(0) < m.log_px - 1.0)  # The ELBO lies below log p(x).
  mean, logvar = (np.asarray(a) for a in m._encode(params, m.x))
  np.testing.assert_allclose(out["mean"][0], mean, rtol=1e-6)
  np.testing.assert_allclose(
    out["kl_per_dim"][0], 0.5 * (np.exp(logvar) + mean**2 - 1 - logvar), rtol=1e-5
  )


# --------------------------------------------------------------------------
# Chunking and batching change nothing; one compile.


@functools.cache
def _tiny_vae():
  model = models.make_mlp_vae(event_shape=(6, 5, 1), latents=3, encoder_hidden=(8,))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 6, 5, 1)))
  x = (np.random.default_rng(1).uniform(size=(7, 6, 5, 1)) < 0.4).astype(np.float32)
  return model, params, x


@pytest.fixture(scope="module")
def unchunked_reference():
  """Per example n: losses.iw_bound and losses.elbo with key fold_in(key, n), K = 50."""
  model, params, x = _tiny_vae()
  key = jax.random.key(5)
  ll = functools.partial(losses.bernoulli_log_likelihood, event_ndims=3)

  @jax.jit
  def one(n, x_n):  # x_n: [1, *event]; the same K samples for both.
    mean, logvar = model.encode(params, x_n)
    args = (jax.random.fold_in(key, n), x_n, mean, logvar, functools.partial(model.decode, params))
    elbo = losses.elbo(*args, ll, num_samples=50)
    return losses.iw_bound(*args, ll, num_samples=50)[0], elbo.reconstruction[0], elbo.kl[0]

  log_px, rec, kl = zip(*(one(n, x[n : n + 1]) for n in range(len(x))), strict=True)
  return key, np.array(log_px), np.array(rec), np.array(kl)


# (7, 3): chunks that do not divide K = 50 and batches that do not divide the 7 examples.
@pytest.mark.parametrize(("sample_chunk", "batch_size"), [(50, 7), (7, 3)])
def test_chunked_estimate_equals_unchunked_iw_bound(unchunked_reference, sample_chunk, batch_size):
  """Example n's estimate is losses.iw_bound with key fold_in(key, n), however it is cut."""
  model, params, x = _tiny_vae()
  key, log_px, rec, kl = unchunked_reference
  fn = estimators.make_per_example_fn(model, num_samples=50, sample_chunk=sample_chunk)
  got = estimators.per_example_values(fn, params, x, key, batch_size)
  np.testing.assert_allclose(got["log_px"], log_px, rtol=1e-5)
  np.testing.assert_allclose(got["reconstruction"], rec, rtol=1e-5)
  np.testing.assert_allclose(got["kl_per_dim"].sum(-1), kl, rtol=1e-5)
  assert fn._cache_size() == 1  # The padded last batch reused the compiled program.


# --------------------------------------------------------------------------
# Conversions and summaries by hand.


def test_standard_error():
  assert estimators.standard_error(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
    0.6454972243679028, rel=1e-12
  )  # sqrt(5/3) / 2


def test_active_units():
  means = np.array([[-1.0, 0.05, 0.15], [1.0, -0.05, -0.15]] * 3)
  count, variances = estimators.active_units(means)
  np.testing.assert_allclose(variances, [1.0, 0.0025, 0.0225], rtol=1e-12)
  assert count == 2  # Var 0.0025 is below the 0.01 threshold.
  assert estimators.active_units(means, threshold=0.001)[0] == 3


def test_summarize_split_by_hand():
  values = {
    "log_px": np.array([-100.0, -102.0]),
    "ess": np.array([10.0, 30.0]),
    "reconstruction": np.array([-90.0, -94.0]),
    "kl": np.array([5.0, 7.0]),
    "kl_per_dim": np.array([[4.0, 1.0], [6.0, 1.0]]),
    "mean": np.array([[1.0, 0.0], [-1.0, 0.0]]),
    "reconstruction_at_mean": np.array([-80.0, -82.0]),
    "squared_error": np.array([10.0, 20.0]),
  }
  to_bits = functools.partial(
    likelihoods.Bernoulli().bits_per_dim, num_dims=784, binarization="dynamic", binary_data=False
  )
  s = estimators.summarize_split(values, to_bits_per_dim=to_bits)
  assert s["log_likelihood"]["nll_nats"] == 101.0
  assert s["log_likelihood"]["standard_error_nats"] == pytest.approx(1.0)  # std sqrt(2) / sqrt(2)
  assert s["log_likelihood"]["bits_per_dim"] == pytest.approx(101.0 / (784 * math.log(2)))
  assert s["log_likelihood"]["standard_error_bits_per_dim"] == pytest.approx(
    1 / (784 * math.log(2))
  )
  assert s["log_likelihood"]["ess_mean"] == 20.0
  assert s["elbo"] == -98.0 and s["neg_elbo"] == 98.0  # (-95 + -101) / 2
  assert s["rate"] == 6.0 and s["distortion"] == 92.0
  assert s["kl_per_dim"] == [5.0, 1.0]
  assert s["active_units"] == 1 and s["posterior_mean_variance"] == [1.0, 0.0]
  assert s["distortion_at_posterior_mean"] == 81.0 and s["mse_per_image"] == 15.0
  assert "log_likelihood" not in estimators.summarize_split(values, log_likelihood=False)
  # A density of continuous data has no bits per dimension to report.
  assert estimators.summarize_split(values)["log_likelihood"]["bits_per_dim"] is None
  # A prior without per-dimension KL terms (the VampPrior): the rate, no kl_per_dim.
  del values["kl_per_dim"]
  s = estimators.summarize_split(values)
  assert s["rate"] == 6.0 and "kl_per_dim" not in s


# --------------------------------------------------------------------------
# PCA.


def test_pca_recovers_a_known_subspace():
  rng = np.random.default_rng(0)
  basis, _ = np.linalg.qr(rng.normal(size=(5, 2)))  # Orthonormal columns u1, u2.
  # All four sign combinations equally often: mean 0, Var(a) = 4, Var(b) = 1, Cov(a, b) = 0.
  a = np.tile([2.0, 2.0, -2.0, -2.0], 1000)
  b = np.tile([1.0, -1.0, 1.0, -1.0], 1000)
  offset = rng.normal(size=5)
  x = offset + a[:, None] * basis[:, 0] + b[:, None] * basis[:, 1]
  pca = baselines.fit_pca(x, 2, chunk=1000)
  np.testing.assert_allclose(pca.variances, [4.0, 1.0], rtol=1e-10)
  np.testing.assert_allclose(np.abs(pca.components @ basis), np.eye(2), atol=1e-10)
  np.testing.assert_allclose(pca.reconstruct(x), x, atol=1e-10)
  one = baselines.fit_pca(x, 1)
  # Dropping u2 costs b^2 per example: mean squared error = Var(b).
  mse = np.mean(np.sum((one.reconstruct(x) - x) ** 2, -1))
  assert mse == pytest.approx(1.0, rel=1e-10)
  # Fewer examples than dimensions takes the SVD path: the same answer.
  few = baselines.fit_pca(x[:3], 2)  # 3 examples of 5 dimensions.
  cov = baselines.fit_pca(np.tile(x[:3], (2, 1)), 2)  # The same points twice: 6 > 5.
  np.testing.assert_allclose(few.variances, cov.variances, rtol=1e-10)
  np.testing.assert_allclose(np.abs(few.components @ cov.components.T), np.eye(2), atol=1e-8)
  assert few.total_variance == pytest.approx(cov.total_variance, rel=1e-12)


def test_pca_baseline_bernoulli_on_exactly_representable_data():
  rng = np.random.default_rng(1)
  patterns = (rng.uniform(size=(2, 30)) > 0.5).astype(np.float64)
  x = patterns[rng.integers(0, 2, size=200)]  # One direction of variation.
  pca = baselines.fit_pca(x, 1)
  out = baselines.pca_baseline(pca, x, x, likelihoods.Bernoulli())
  assert out["mse_per_image"] == pytest.approx(0.0, abs=1e-12)
  assert out["explained_variance_fraction"] == pytest.approx(1.0)
  # Exact reconstructions: the smallest clip wins, NLL = 30 * -log(1 - 1e-6) = 3e-5 up to
  # float32 rounding of logits near 14 (clip 1e-5 would give 3e-4).
  assert out["bernoulli_clip"] == 1e-6
  assert 0 <= out["distortion"] < 1e-4


# --------------------------------------------------------------------------
# The evaluate command.


def _smoke_config(tfds_dir, arg="smoke"):
  spec = importlib.util.spec_from_file_location("mnist_config", REPO / "configs" / "mnist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.data_dir = tfds_dir
  config.progress_bar = False
  config.num_epochs = 1
  return config


def test_config_mismatch_is_refused_and_missing_fields_default(tfds_dir, tmp_path):
  config = _smoke_config(tfds_dir)
  saved = json.loads(config.to_json())
  del saved["objective"]  # Written before the field existed: counts as its default.
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdir_lib.check_evaluation(config, tmp_path)
  config.binarization = "threshold"
  with pytest.raises(ValueError, match=r"binarization: workdir has 'dynamic'"):
    workdir_lib.check_evaluation(config, tmp_path)
  with pytest.raises(FileNotFoundError, match="Train first"):
    evaluate.restore_targets(config, tmp_path, (28, 28, 1), 400)


@pytest.fixture(scope="module")
def vae_workdir(tfds_dir, tmp_path_factory):
  """The smoke config trained for one epoch (12 steps)."""
  config = _smoke_config(tfds_dir)
  workdir = tmp_path_factory.mktemp("vae") / "run"
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def test_evaluate_workdir_end_to_end(vae_workdir):
  config, workdir = vae_workdir
  results = evaluate.evaluate_workdir(config, workdir, num_samples=20)

  saved = json.loads((workdir / "eval" / "step_00000012_k20.json").read_text())
  assert saved == {k: v for k, v in results.items() if k != "path"}
  assert saved["checkpoint_step"] == 12 and saved["num_importance_samples"] == 20
  test = saved["test"]
  ll = test["log_likelihood"]
  assert ll["bits_per_dim"] == pytest.approx(ll["nll_nats"] / (784 * math.log(2)), rel=1e-12)
  assert 0 < ll["standard_error_nats"] < 5 and 1 <= ll["ess_min"] <= ll["ess_mean"] <= 20
  assert ll["nll_nats"] < test["neg_elbo"] + 1.0  # IW_20 is (near) above the ELBO.
  assert test["elbo"] == pytest.approx(-test["rate"] - test["distortion"], rel=1e-9)
  assert len(test["kl_per_dim"]) == 2 and sum(test["kl_per_dim"]) == pytest.approx(test["rate"])
  assert test["num_examples"] == 100 and saved["train"]["num_examples"] == 400
  assert "log_likelihood" not in saved["train"] and 0 <= test["active_units"] <= 2
  # The closed-form rate equals the training loop's test KL for the same checkpoint.
  rows = [r for r in writers.read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"]
  assert test["rate"] == pytest.approx(rows[-1]["kl"], rel=1e-4)
  pca = saved["pca"]
  assert pca["num_components"] == 2 and pca["mse_per_image"] > 0 and pca["distortion"] > 0
  assert pca["model_mse_per_image"] == test["mse_per_image"]
  assert saved["skipped"] == {} and saved["wall_time_s"] > 0 and saved["peak_rss_mib"] > 100
  for name in ("prior_samples", "reconstructions"):  # Image grids, as arrays in TensorBoard.
    png = workdir / "images" / f"eval_{name}_00000012.png"
    assert f"images/{png.name}" in saved["images"]
    image = np.asarray(Image.open(png))
    assert image.shape[0] > 56 and image.shape[1] > 56 and image.std() > 0
  # Figures, with matplotlib: PNG and PDF of each.
  for name in ("training_curves", "interpolations", "traversals", "latent_map"):
    for ext in ("png", "pdf"):
      assert f"figures/{name}_00000012.{ext}" in saved["images"], (name, ext)
      assert (workdir / "figures" / f"{name}_00000012.{ext}").stat().st_size > 1000


def test_evaluate_command_line(vae_workdir, tfds_dir):
  _, workdir = vae_workdir
  cmd = [
    sys.executable,
    "-m",
    "vae_jax.main",
    "--config=configs/mnist.py:smoke",
    f"--config.data_dir={tfds_dir}",
    "--config.progress_bar=False",
    f"--workdir={workdir}",
    "--mode=evaluate",
    "--eval_num_samples=10",
  ]
  proc = subprocess.run(
    cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=process_env()
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads((workdir / "eval" / "step_00000012_k10.json").read_text())
  assert saved["num_importance_samples"] == 10 and saved["test"]["elbo_num_samples"] == 10
  rows = [r for r in writers.read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"]
  assert saved["test"]["rate"] == pytest.approx(rows[-1]["kl"], rel=1e-4)
  assert saved["test"]["log_likelihood"]["nll_nats"] > 0
  assert all((workdir / p).is_file() for p in saved["images"])
  names = {pathlib.Path(p).name for p in saved["images"]}
  assert {"eval_prior_samples_00000012.png", "eval_reconstructions_00000012.png"} <= names
  for figure in (
    "reconstructions",
    "training_curves",
    "interpolations",
    "traversals",
    "latent_map",
  ):
    assert {f"{figure}_00000012.png", f"{figure}_00000012.pdf"} <= names, figure
  assert saved["matmul_precision"] == "highest"


def test_evaluate_autoencoder_skips_likelihoods(tfds_dir, tmp_path):
  config = _smoke_config(tfds_dir)
  config.objective = "autoencoder"
  workdir = tmp_path / "ae"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json())
  built = trainer.build_trainer(config, (28, 28, 1), 400)
  model, state = built.model, built.init_state()
  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints")
  checkpointer.save(7, state)  # An untrained autoencoder is enough for the bookkeeping.
  checkpointer.close()

  results = evaluate.evaluate_workdir(config, workdir, num_samples=20)
  saved = json.loads((workdir / "eval" / "step_00000007.json").read_text())
  assert saved == {k: v for k, v in results.items() if k != "path"}
  assert saved["checkpoint_step"] == 7 and saved["num_importance_samples"] is None
  for name in ("log_likelihood", "elbo", "rate", "kl_per_dim", "active_units", "prior_samples"):
    assert name in saved["skipped"] and name not in saved["test"]
  # Its distortion is the training loop's deterministic test reconstruction.
  data = datasets.load("mnist", tfds_dir)
  test_x = input_pipeline.eval_images(data["test"].images, config.binarization)
  loop = estimators.make_eval_fn(model, 64, deterministic=True)(
    state.params, test_x, jax.random.key(0)
  )
  assert saved["test"]["distortion_at_posterior_mean"] == pytest.approx(
    -float(loop["reconstruction"]), rel=1e-5
  )
  assert saved["pca"]["mse_per_image"] > 0 and saved["test"]["mse_per_image"] > 0
  names = {pathlib.Path(p).name for p in saved["images"]}
  figures = ("reconstructions", "training_curves", "interpolations", "traversals", "latent_map")
  expected = {f"{n}_00000007.{e}" for n in figures for e in ("png", "pdf")}
  assert names == {"eval_reconstructions_00000007.png", *expected}
  assert all((workdir / p).is_file() for p in saved["images"])


def _dot_precisions(jaxpr) -> list[str]:
  """The precision of every matmul (dot_general) in a printed jaxpr, nested ones included."""
  text = str(jaxpr)
  count = text.count("dot_general[")
  highest = text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)")
  return ["HIGHEST"] * highest + ["DEFAULT"] * (count - highest)


def test_reported_numbers_are_traced_at_full_float32_matmul_precision():
  """On GPUs and TPUs the default matmul may use TF32 or bfloat16 passes; evaluation does not."""
  model = models.make_mlp_vae(event_shape=(6,), latents=2, encoder_hidden=(5,))
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))
  x = jnp.ones((4, 6)) * 0.5
  split_elbo = estimators.make_eval_fn(model, 2)
  per_example = estimators.make_per_example_fn(model, num_samples=3)
  key, idx = jax.random.key(1), jnp.arange(4)
  for fn, args in ((split_elbo, (params, x, key)), (per_example, (params, x, key, idx))):
    precisions = _dot_precisions(jax.make_jaxpr(fn)(*args))
    assert precisions and set(precisions) == {"HIGHEST"}, precisions
  # Training keeps the platform default unless config.matmul_precision says otherwise.
  spec = objectives.Spec()
  step = step_lib.make_train_step(objectives.make_loss_fn(model, spec), optax.sgd(0.1))
  state = step_lib.initial_state(model, optax.sgd(0.1), key, (6,))
  assert set(_dot_precisions(jax.make_jaxpr(step)(state, x, key))) == {"DEFAULT"}
  step = step_lib.make_train_step(
    objectives.make_loss_fn(model, spec), optax.sgd(0.1), matmul_precision="highest"
  )
  assert set(_dot_precisions(jax.make_jaxpr(step)(state, x, key))) == {"HIGHEST"}


def test_unrolled_evaluation_loops_give_the_same_numbers():
  """``unroll`` (convolutional models on CPU, execution.Plan.unroll_loops) changes where the
  loop runs, not what it computes; loops longer than MAX_UNROLL stay loops."""
  model = models.make_mlp_vae(event_shape=(6,), latents=2, encoder_hidden=(5,))
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))
  x = (jax.random.uniform(jax.random.key(2), (10, 6)) > 0.5).astype(jnp.float32)
  key, idx = jax.random.key(1), jnp.arange(10)
  split = [estimators.make_eval_fn(model, 3, unroll=u)(params, x, key) for u in (False, True)]
  for k in split[0]:
    np.testing.assert_allclose(split[0][k], split[1][k], rtol=1e-6)
  per_example = [
    estimators.make_per_example_fn(model, num_samples=7, sample_chunk=2, unroll=u)(
      params, x, key, idx
    )
    for u in (False, True)
  ]
  for k in per_example[0]:
    np.testing.assert_allclose(per_example[0][k], per_example[1][k], rtol=1e-6)

  def unrolls(fn, *args):  # Each scan's unroll factor (its length when fully unrolled).
    return [int(u) for u in re.findall(r"unroll=(\d+)", str(jax.make_jaxpr(fn)(*args)))]

  assert unrolls(estimators.make_eval_fn(model, 3), params, x, key) == [1]
  assert unrolls(estimators.make_eval_fn(model, 3, unroll=True), params, x, key) == [4]
  many = jnp.zeros((estimators.MAX_UNROLL + 1, 6))
  assert unrolls(estimators.make_eval_fn(model, 1, unroll=True), params, many, key) == [1]
  fn = estimators.make_per_example_fn(model, num_samples=7, sample_chunk=2, unroll=True)
  assert unrolls(fn, params, x, key, idx) == [4]

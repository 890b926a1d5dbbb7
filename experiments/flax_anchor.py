"""The anchor of the speed comparisons: the VAE a user writes in an afternoon from the Flax
example (google/flax, examples/vae), with its train step under ``jax.jit``.

  python experiments/flax_anchor.py IDX_DIR [EPOCHS [BATCH]]

The example's recipe, written here from its public description (read, not copied): an MLP
encoder 784-500-(20, 20) and decoder 20-500-784 with ReLU, one reparameterized sample
per example, the Bernoulli likelihood as the binary cross-entropy of the decoder's
logits, the closed-form KL, Adam with learning rate 1e-3, batches of 128. As the example's
input pipeline does, batches are gathered on the host from a shuffled order each epoch
and handed to the step one at a time; the test ELBO over the whole test split is
computed after each epoch. The data are the four IDX files of MNIST or Fashion-MNIST in
``IDX_DIR``, binarized by thresholding at 0.5 (train and test). The example as published
runs its step eagerly, about ten times slower; only the ``jax.jit`` is added. Prints the
final test negative ELBO in nats. ``BATCH`` (default 128, the example's) is for timing the
same loop at other batch sizes (``experiments/accelerator_suite.py`` fills a GPU with 4096).

It imports nothing of vae_jax: ``experiments/benchmark.py`` runs it beside the project's
command, as whole processes, and reports the ratio of their wall times.
"""

import gzip
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

LATENTS, HIDDEN, PIXELS, BATCH, LEARNING_RATE = 20, 500, 784, 128, 1e-3


def read_images(path: pathlib.Path) -> np.ndarray:
  """An IDX image file as ``[n, 784]`` floats in [0, 1] (its 16-byte header skipped)."""
  with gzip.open(path, "rb") as f:
    pixels = np.frombuffer(f.read(), np.uint8, offset=16)
  return pixels.reshape(-1, PIXELS).astype(np.float32) / 255.0


class VAE(nn.Module):
  @nn.compact
  def __call__(self, x, key):
    h = nn.relu(nn.Dense(HIDDEN, name="encoder_hidden")(x))
    mean = nn.Dense(LATENTS, name="encoder_mean")(h)
    logvar = nn.Dense(LATENTS, name="encoder_logvar")(h)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    h = nn.relu(nn.Dense(HIDDEN, name="decoder_hidden")(z))
    return nn.Dense(PIXELS, name="decoder_logits")(h), mean, logvar


def negative_elbo(params, x, key):
  """The batch mean of ``BCE(logits, x) + KL(q(z|x) || N(0, I))``, in nats."""
  logits, mean, logvar = VAE().apply({"params": params}, x, key)
  log_p = nn.log_sigmoid(logits)
  log_not_p = jnp.log(-jnp.expm1(log_p))  # log(1 - sigmoid(logits)).
  bce = -jnp.sum(x * log_p + (1.0 - x) * log_not_p, axis=-1)
  kl = 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, axis=-1)
  return jnp.mean(bce + kl)


optimizer = optax.adam(LEARNING_RATE)


@jax.jit
def train_step(params, opt_state, x, key):
  grads = jax.grad(negative_elbo)(params, x, key)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


evaluate = jax.jit(negative_elbo)


def main(idx_dir: str, epochs: int, batch: int = BATCH) -> float:
  train = (read_images(pathlib.Path(idx_dir) / "train-images-idx3-ubyte.gz") > 0.5).astype(
    np.float32
  )
  test = jnp.asarray(
    (read_images(pathlib.Path(idx_dir) / "t10k-images-idx3-ubyte.gz") > 0.5).astype(np.float32)
  )
  key, init_key = jax.random.split(jax.random.key(0))
  params = VAE().init(init_key, jnp.zeros((batch, PIXELS)), key)["params"]
  opt_state = optimizer.init(params)
  order = np.random.default_rng(0)
  loss = float("nan")
  for _ in range(epochs):
    shuffled = order.permutation(len(train))
    for start in range(0, len(train) - batch + 1, batch):
      key, step_key = jax.random.split(key)
      x = train[shuffled[start : start + batch]]
      params, opt_state = train_step(params, opt_state, x, step_key)
    key, eval_key = jax.random.split(key)
    loss = float(evaluate(params, test, eval_key))
  return loss


if __name__ == "__main__":
  if len(sys.argv) not in (2, 3, 4):
    sys.exit(__doc__.split("\n\n")[1])
  neg_elbo = main(
    sys.argv[1],
    int(sys.argv[2]) if len(sys.argv) > 2 else 10,
    int(sys.argv[3]) if len(sys.argv) > 3 else BATCH,
  )
  print(f"final test neg-ELBO {neg_elbo:.2f}")

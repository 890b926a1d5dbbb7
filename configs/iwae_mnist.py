"""MNIST test log-likelihood under the IWAE paper's protocol (Burda et al. 2015, Table 1).

Dynamically binarized MNIST (training images redrawn every step, the test set
binarized once with a fixed seed); test NLL estimated with K = 5000
importance samples::

  python -m vae_jax.main --config=configs/iwae_mnist.py:iwae2 --workdir=runs/iwae2
  python -m vae_jax.main --config=configs/iwae_mnist.py:iwae2 --workdir=runs/iwae2 \\
    --mode=evaluate --eval_num_samples=5000

Arguments (``--config=configs/iwae_mnist.py:<arg>``), with the paper's numbers:

* ``vae1``: one stochastic layer, 784-200-200-(50) tanh MLP and its mirror,
  trained on the ELBO with k = 1 sample. Published: 86.76 nats.
* ``iwae1``: the same model trained on the IWAE bound with k = 50.
  Published: 84.78 nats.
* ``vae2``: two stochastic layers, 784-200-200-(100)-100-100-(50) with
  mirrored decoders (``q(z1|x) q(z2|z1)``, ``p(z2) p(z1|z2) p(x|z1)``), ELBO
  with k = 1. Published: 85.33 nats.
* ``iwae2``: the two-layer model on the IWAE bound, k = 50. Published: 82.90.

Training as in the paper (section 5): Adam with beta1 = 0.9, beta2 = 0.999,
eps = 1e-4 (set here through ``optimizer.name="adam_iwae"``), batch 20, and the
learning rate 1e-3 * 10**(-i/7) for 3**i epochs, i = 0..7: 3,280 epochs.
That is about 9.8M steps; on one GPU the k = 50 runs take days.
``--config.num_epochs=N`` shortens the run (the schedule is the paper's for
the epochs it covers).

The MNIST files are not on this project's offline CI machine; with internet
access they are downloaded on first use (see the README's data section).

Append ``,smoke`` (e.g. ``:iwae2,smoke``) for a seconds-long run of the same code.
"""

from vae_jax.config import base_config, parse_arg, shrink_for_smoke

ARGS = ("vae1", "iwae1", "vae2", "iwae2")


def get_config(arg: str | None = None):
  kind, modifiers = parse_arg(arg, choices=ARGS, required=True)
  smoke = "smoke" in modifiers
  config = base_config()
  config.dataset = "mnist"
  config.binarization = "dynamic"
  config.model.kind = "mlp"
  config.model.activation = "tanh"
  config.model.encoder_hidden = (200, 200)
  config.model.latents = 50
  if kind.endswith("2"):
    config.model.latents = 100
    config.model.stochastic_layers = 2
    config.model.top_hidden = (100, 100)
    config.model.top_latents = 50
  if kind.startswith("iwae"):
    config.objective = "iwae"
    config.num_samples = 50
  config.optimizer.name = "adam_iwae"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "iwae"
  config.batch_size = 20
  config.num_epochs = 3280
  config.steps_per_dispatch = 500
  config.log_every_steps = 3000  # One row per epoch (60,000 / 20 steps).
  config.eval_every_steps = 3000 * 40
  config.checkpoint_every_steps = 3000 * 5
  if smoke:
    shrink_for_smoke(config, num_epochs=1)
    config.num_samples = min(config.num_samples, 3)
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.model.top_latents = 2
    config.model.top_hidden = (8,)
  return config

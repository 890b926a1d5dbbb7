"""Fashion-MNIST test log-likelihood under the VampPrior / Exemplar VAE protocol.

The rows of the Exemplar VAE paper's Fashion-MNIST table (Norouzi, Fleet &
Norouzi 2020, Table 1; their setup is the VampPrior paper's, Tomczak & Welling
2018, section 4), one config argument per row::

  python -m vae_jax.main --config=configs/fashion_mnist_likelihood.py:vae --workdir=runs/fm_vae
  python -m vae_jax.main --config=configs/fashion_mnist_likelihood.py:vae --workdir=runs/fm_vae \\
    --mode=evaluate --eval_num_samples=5000

| argument | model | published NLL (nats) |
|---|---|---:|
| ``vae`` | VAE, Gaussian prior | 228.70 |
| ``vae_vampprior`` | VAE, VampPrior (500 pseudo-inputs) | 227.35 |
| ``hvae`` | HVAE (two stochastic layers), Gaussian prior | 227.37 |
| ``hvae_vampprior`` | HVAE, VampPrior | 226.72 |

Append ``,iwae`` to train the same model on the importance-weighted bound
(``k = 5``; with DReG gradients for the Gaussian prior, whose prior does not
depend on the encoder), and ``,smoke`` for a seconds-long run of the same code.

The protocol, as in the two papers' public code (github.com/jmtomczak/vae_vampprior,
github.com/sajadn/Exemplar-VAE; read, not copied):

* data: the first 50,000 training images for training and the last 10,000 for
  validation (Exemplar VAE's ``use_fixed_validation=True``), the 10,000 test
  images; training images dynamically binarized (a fresh Bernoulli draw every
  step), validation and test binarized once with a fixed seed;
* networks: gated dense layers ``(W1 h + b1) * sigmoid(W2 h + b2)`` of 300
  units, two in the encoder and two in the decoder (the HVAE's as in
  ``vae_jax.models``, hierarchy ``"vampprior"``); the encoders'
  log-variances clipped to [-6, 2] (``Hardtanh``); weights initialized
  ``N(0, 2 / fan_in)`` (``he_init``); z = 40 (and 40 for the HVAE's z2);
  VampPrior pseudo-inputs initialized ``N(0.05, 0.01^2)`` and clipped to [0, 1];
* training: ``AdamNormGrad`` (each parameter's gradient divided by its norm,
  then Adam) with learning rate 5e-4, batch 100, KL warm-up over 100 epochs,
  early stopping when the validation ELBO has not improved for 50 epochs
  (warm-up epochs not counted), at most 2,000 epochs;
* evaluation: the best-on-validation parameters, ``-log p(x)`` on the test
  set by importance sampling with K = 5000 samples from the encoder.

Differences from that code, all small: KL warm-up is linear per step here,
per epoch there (``beta = epoch / 100``); their early stopping stops after 51
epochs without improvement, this one after 50; their validation and test
binarizations are one draw with NumPy seed 777, ours one draw from JAX seeds
(1 and 0); biases start at zero here, at PyTorch's ``U(-1/sqrt(fan_in),
1/sqrt(fan_in))`` there; Bernoulli likelihoods from logits here, from
probabilities clamped to [1e-5, 1 - 1e-5] there.

Legacy arguments (the earlier, shorter protocol of results/likelihood/table.md:
600 epochs on all 60,000 images, plain ReLU units, no early stopping):
``legacy_mlp``, ``legacy_hvae`` (the IWAE paper's hierarchy), ``legacy_conv_hvae``.
"""

from vae_jax.config import base_config, parse_arg, shrink_for_smoke

ROWS = ("vae", "vae_vampprior", "hvae", "hvae_vampprior")
LEGACY = ("legacy_mlp", "legacy_hvae", "legacy_conv_hvae")


def get_config(arg: str | None = None):
  kind, parts = parse_arg(arg, choices=ROWS + LEGACY, modifiers=("iwae", "smoke"), default="vae")
  config = _legacy(kind) if kind in LEGACY else _protocol(kind)
  if "iwae" in parts:
    config.objective = "iwae"
    config.num_samples = 5
    config.kl_warmup_epochs = 0.0  # The IWAE bound has no KL weight to warm up.
    if config.model.prior == "standard":
      config.gradient_estimator = "dreg"
  if "smoke" in parts:
    shrink_for_smoke(config, num_epochs=1)
    config.eval_every_steps = 0
    config.kl_warmup_epochs = min(config.kl_warmup_epochs, 0.5)
    config.validation_examples = min(config.validation_examples, 100)
    config.model.num_pseudo_inputs = 7
    if config.model.stochastic_layers == 2:
      config.model.top_latents = 2
      config.model.top_hidden = (8,)
  return config


def _protocol(kind: str):
  config = base_config()
  config.dataset = "fashion_mnist"
  config.binarization = "dynamic"
  config.validation_examples = 10000
  config.model.latents = 40
  config.model.encoder_hidden = (300, 300)
  config.model.gated = True
  config.model.logvar_bound = None
  config.model.logvar_clip = (-6.0, 2.0)
  config.model.kernel_init = "he_normal"
  if kind.startswith("hvae"):
    config.model.stochastic_layers = 2
    config.model.hierarchy = "vampprior"
    config.model.top_latents = 40
    config.model.top_hidden = (300, 300)
  if kind.endswith("vampprior"):
    config.model.prior = "vampprior"
    config.model.num_pseudo_inputs = 500
    config.model.pseudo_inputs_mean = 0.05
    config.model.pseudo_inputs_std = 0.01
  config.optimizer.name = "adam_normgrad"
  config.optimizer.learning_rate = 5e-4
  config.batch_size = 100
  config.num_epochs = 2000
  config.kl_warmup_epochs = 100.0
  config.early_stopping_patience_epochs = 50
  config.eval_every_steps = 0  # Every epoch: validation ELBO for early stopping, test ELBO.
  config.num_image_samples = 16
  return config


def _legacy(kind: str):
  config = base_config()
  config.dataset = "fashion_mnist"
  config.binarization = "dynamic"
  config.model.latents = 40
  config.model.encoder_hidden = (300, 300)
  config.model.activation = "relu"
  config.optimizer.learning_rate = 5e-4
  config.batch_size = 100
  config.num_epochs = 600
  config.eval_every_steps = 12000  # Every 20 epochs of 60,000 images: the test ELBO curve.
  if kind in ("legacy_hvae", "legacy_conv_hvae"):
    config.model.stochastic_layers = 2
    config.model.top_latents = 40
    config.model.top_hidden = (300, 300)
    config.kl_warmup_epochs = 50.0
  if kind == "legacy_conv_hvae":
    config.model.kind = "conv"
    config.model.conv_features = (32, 64)
    config.model.encoder_hidden = (300,)
  return config

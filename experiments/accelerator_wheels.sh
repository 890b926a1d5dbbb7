#!/usr/bin/env bash
# Prepares .accel/ for experiments/accelerator_suite.py on a device machine that has no
# network: the wheels of the project's dependencies that its image lacks, and the data.
#
#   PYTHON=.venv/bin/python experiments/accelerator_wheels.sh [--with-dsprites NPZ]
#
# .accel/wheels: tensorflow-datasets, grain, ml_collections, tensorboardX and what they need
#   that the image does not hold (see /work/.library/device/KINDS.md's package list), each at
#   the version installed in $PYTHON's environment (the versions the tests ran with), built
#   for CPython 3.12 on x86-64 Linux. jax, jaxlib, flax, optax, orbax-checkpoint and chex are
#   never fetched: the image's own are the ones to measure (and they match its CUDA).
# .accel/data/fashion-mnist: the four IDX files (from $FASHION_MNIST_DIR, default
#   /usr/share/datasets/fashion-mnist: `apt-get install dataset-fashion-mnist`).
# .accel/data/dsprites: with --with-dsprites, the published dSprites npz for phase d. It does
#   not fit in one call's 64 MiB beside Fashion-MNIST: carry it in a call of its own
#   (--phases=d), after moving .accel/data/fashion-mnist aside.
#
# The suite's command on the device machine is in docs/performance.md, "On an accelerator".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
DSPRITES_NPZ=""
if [[ ${1:-} == --with-dsprites ]]; then
  DSPRITES_NPZ=${2:?--with-dsprites needs the npz file}
fi

# The runtime dependencies (pyproject.toml) and theirs, less what the image holds.
PACKAGES=(
  tensorflow-datasets array_record importlib_resources grain ml_collections tensorboardX
  dm-tree immutabledict promise simple_parsing docstring-parser tensorflow-metadata
  googleapis-common-protos termcolor toml portpicker
)
EXCLUDED='^(jax|jaxlib|flax|optax|orbax_checkpoint|chex)-'
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done

rm -rf .accel/wheels
mkdir -p .accel/wheels .accel/data
for name in "${PACKAGES[@]}"; do
  version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
  spec=$name${version:+==$version}
  if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .accel/wheels "$spec"; then
    # A pure-Python package published only as source (promise): build its wheel here.
    echo "no wheel of $spec on PyPI: building one" >&2
    "$PYTHON" -m pip wheel -q --no-deps --no-binary=:all: -w .accel/wheels "$spec"
  fi
done
if ls .accel/wheels | grep -E "$EXCLUDED"; then
  echo "a wheel above is preinstalled on the device machine and must not be carried" >&2
  exit 1
fi
if [[ $(ls .accel/wheels | sed 's/-[0-9].*//' | sort | uniq -d) ]]; then
  echo "two versions of one package in .accel/wheels: the install would stop" >&2
  exit 1
fi

rm -rf .accel/data/fashion-mnist
mkdir -p .accel/data/fashion-mnist
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz \
  t10k-labels-idx1-ubyte.gz; do
  cp "$FASHION_MNIST_DIR/$f" .accel/data/fashion-mnist/
done
if [[ -n $DSPRITES_NPZ ]]; then
  mkdir -p .accel/data/dsprites
  cp "$DSPRITES_NPZ" .accel/data/dsprites/
fi

du -sh .accel/wheels .accel/data/* >&2
total=$(du -sm .accel | cut -f1)
echo "$(ls .accel/wheels | wc -l) wheels; .accel is ${total} MiB (one call carries 64 MiB," \
  "the repository's tracked files included)" >&2
if ((total > 56)); then
  echo "warning: .accel and the repository may not fit in one call's 64 MiB" >&2
fi

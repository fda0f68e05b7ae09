# The code image for the Dagster user-code deployment and for the per-step pods.
#
# torch: the CPU build by default (PyTorch's CPU wheel index; PyPI's Linux torch bundles CUDA).
# For the GPU inference pods, build with a CUDA wheel index:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t bativision:cuda .
# TORCH_VERSION picks the version on either index.
#
# It runs as a non-root user with a numeric uid (Kubernetes' runAsNonRoot can check it) on a
# read-only root filesystem: everything it writes at run time goes under /scratch, which the pods
# mount as an emptyDir (HOME, TMPDIR and BATIVISION_CACHE_DIR point there). Whatever is derived from
# the sources (the dbt manifest, bytecode) is built here, at build time.
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/bativision
COPY requirements.lock pyproject.toml README.md ./
RUN pip install ${TORCH_INDEX:+--index-url $TORCH_INDEX} torch==${TORCH_VERSION} \
 && pip install -r requirements.lock
COPY orchestration orchestration
COPY assets assets
COPY ops ops
COPY synthetic synthetic
COPY resources resources
COPY dbt dbt
COPY models models
COPY workspace.yaml ./
# The manifest is parsed now: importing the code location then only reads it (assets/dbt.py).
RUN pip install --no-deps . \
 && python -c "import assets.dbt; assets.dbt.ensure_manifest()" \
 && python -m compileall -q orchestration assets ops synthetic resources \
 && groupadd --gid 10001 bativision \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /scratch --shell /usr/sbin/nologin bativision \
 && mkdir /scratch && chown 10001:10001 /scratch
# The sources here, not the copy pip put in site-packages: paths (dbt/, models/) are relative to them.
ENV PYTHONPATH=/opt/bativision \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/scratch \
    TMPDIR=/scratch \
    BATIVISION_CACHE_DIR=/scratch
USER 10001:10001
EXPOSE 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "orchestration.definitions"]

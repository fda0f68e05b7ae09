# The code image for the Dagster user-code deployment and for the per-step pods.
# CPU torch by default; for GPU inference pods build with --build-arg TORCH_INDEX=<a CUDA wheel index>.
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=""
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
RUN pip install --no-deps . && python -c "import assets.dbt; assets.dbt.ensure_manifest()"
EXPOSE 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "orchestration.definitions"]

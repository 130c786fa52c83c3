# pg-advisory-lock-exporter: wheels are built in one stage and installed in the next, so the
# image carries no build tools. Runs as a non-root numeric user on a read-only root filesystem.
# Fully qualified, so buildah and podman (no short-name default) pull what docker pulls.
ARG PYTHON_IMAGE=docker.io/library/python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# Bytecode is not written at run time (the root filesystem may be read-only); stdout unbuffered.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PG_ADVISORY_LOCK_EXPORTER_CONFIG_FILE=/etc/pg-advisory-lock-exporter/config.yaml
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels
COPY config.yaml /etc/pg-advisory-lock-exporter/config.yaml
USER 65532:65532
EXPOSE 10105
ENTRYPOINT ["pg-advisory-lock-exporter"]

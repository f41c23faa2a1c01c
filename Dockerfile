# guardrail-proxy: slim Python image, non-root, Hugging Face cache on a volume, config mounted.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models \
    LITELLM_LOCAL_MODEL_COST_MAP=True

RUN groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin proxy

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
# The default config requires a tenant key (GUARDRAIL_API_KEY): the image never serves open on 0.0.0.0.
COPY docker/config.yaml ./config.yaml
# The CPU wheel of torch; on a GPU host build FROM an image with CUDA and drop the index URL.
# ".[otel]" is this source tree with its OpenTelemetry extra, not a registry package to pin (DL3013).
# hadolint ignore=DL3013
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[otel]" \
    && mkdir -p /models /config \
    && chown -R 10001:10001 /models /app

USER 10001:10001
VOLUME ["/models"]
EXPOSE 8080

HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]

# Mount your own config at /app/config.yaml (and policies at /app/policies) to override.
ENTRYPOINT ["guardrail-proxy"]
CMD ["serve", "--config", "/app/config.yaml", "--host", "0.0.0.0", "--port", "8080"]

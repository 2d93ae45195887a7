"""The one settings class. Every field can be set from the environment as GUARDCHAT_<NAME>."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Project root when running from a checkout; the defaults below resolve against it so
# `make run` works from any current directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

EmbeddedModelName = Literal["qwen2.5-1.5b", "qwen2.5-0.5b", "smollm2-135m"]


def split_list(value: Any) -> Any:
    """A list setting as written in the environment or .env: a JSON list (`["a", "b"]`) or comma-separated
    values (`a,b`, the way most tools take lists). Items are trimmed and empty ones dropped, so `a, b,` is
    two items and an empty variable is an empty list. The error never quotes the value: it may be a key."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):  # JSON, so an item may itself contain a comma
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"starts with '[' but is not a valid JSON list ({exc.msg} at character {exc.pos}); "
                    'write ["a", "b"] or a,b'
                ) from None
        else:
            value = text.split(",")
    if isinstance(value, list | tuple):
        return [item.strip() if isinstance(item, str) else item for item in value if not _blank(item)]
    return value


def _blank(item: Any) -> bool:
    return isinstance(item, str) and not item.strip()


# Every list setting uses one of these. NoDecode stops pydantic-settings from insisting on JSON (a bare `a,b`
# used to stop the server with a traceback); split_list then takes either form.
StrList = Annotated[list[str], NoDecode, BeforeValidator(split_list)]
SecretList = Annotated[list[SecretStr], NoDecode, BeforeValidator(split_list)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GUARDCHAT_", env_file=".env", extra="ignore")

    # --- server ---
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    log_format: Literal["json", "text"] = "json"
    metrics_enabled: bool = True
    otel_enabled: bool = False  # needs the [otel] extra

    # --- chat LLM ---
    # llamacpp: a llama.cpp server you run yourself (llama-server): its wire takes GBNF grammars, which the
    # embedded guard's judge needs to answer in the Llama Guard format.
    llm_backend: Literal["embedded", "openai", "trtllm", "llamacpp"] = "embedded"
    llm_url: str | None = Field(
        default=None, description="Base URL of the OpenAI-compatible server, e.g. http://gpu:8000/v1"
    )
    llm_model: str | None = None
    llm_api_key: SecretStr | None = None
    llm_timeout_s: float = 120.0
    llm_connect_timeout_s: float = 5.0
    llm_max_retries: int = 2
    llm_max_tokens: int = 512
    llm_temperature: float = 0.2
    lora_adapters: StrList = Field(
        default_factory=list, description="Allow-list of adapter names a request may select"
    )

    # --- embedded model (llama.cpp in-process) ---
    embedded_model: EmbeddedModelName = "qwen2.5-1.5b"
    embedded_ctx: int = 4096
    embedded_threads: int = 0  # 0 = all cores
    embedded_parallel: int = 2
    # llama.cpp's host-memory prompt cache (KV states of earlier prompts): the answer pages live here (~28 KiB a
    # token for Qwen2.5-1.5B: the 35 shipped pages take ~1 GiB), and the conversations beside them.
    embedded_prompt_cache_mib: int = Field(default=3072, ge=0)

    # --- sessions ---
    # None = the in-process store. "auto" = Redis at redis://127.0.0.1:6379/0 if it answers, else the
    # in-process store: settled once by create_app (app/sessions/factory.py choose_redis_url) before anything
    # reads it; `make run` asks for it (`guardchat serve --redis-auto`) when this is not set.
    # Also redis+sentinel://host:port[,host:port]/<service>[/db] and redis+cluster://host:port[,host:port]
    # (app/redis_client.py, docs/deployment.md "Redis high availability").
    redis_url: str | None = None
    # Replicas that must have a new session or turn before it is answered (Redis WAIT), so a failover cannot lose
    # it. None = 1 with a redis+sentinel:// URL, else 0. Ignored with Redis Cluster.
    redis_replica_acks: int | None = Field(default=None, ge=0)
    # How long a write waits for those replicas; past it the sentinels are asked whether the server is still the
    # primary (then the write stands) or was replaced (then the request fails with 503).
    redis_replica_ack_timeout_ms: int = Field(default=250, ge=1)
    session_ttl_s: int = 7 * 24 * 3600
    session_max_turns: int = 200
    history_turns_in_prompt: int = 6
    session_lock_wait_s: float = 60.0  # a turn waits this long for the previous turn of its session (then 409)
    session_lock_ttl_s: float = 30.0  # how long a crashed holder can block a session
    redis_key_prefix: str = "guardchat:"

    # --- paths ---
    rails_dir: Path = PROJECT_ROOT / "rails"
    knowledge_dir: Path = PROJECT_ROOT / "knowledge"
    data_dir: Path = PROJECT_ROOT / "data"

    # --- guard (Llama Guard 3) ---
    guard_backend: Literal["embedded", "openai"] = "embedded"
    # Stage 1 of the embedded guard: "finetuned" = our MiniLM fine-tuned end to end (app/guard/guard_model.py,
    # decides alone); "linear" = the earlier linear heads on the query embedding, with the LLM judge for
    # their uncertain band (kept for comparison: docs/evaluation.md).
    guard_classifier: Literal["finetuned", "linear"] = "finetuned"
    # OpenVINO threads for the guard model's pass. One: a short message costs 2.7 ms of CPU on one thread and
    # 4.9 ms on two for 0.3 ms less wall time (2-core Xeon, docs/guard-classifier.md); under load CPU is what counts.
    # Texts of LONG_TOKENS (48) tokens or more always run on every core (2 to 4 threads): their pass is the tail.
    guard_threads: int = Field(default=1, ge=0)
    # The fastest engine that can run the loaded rails config (app/guard/rails.py). "auto": NeMo's IORails
    # when every rail is a NeMo catalog input/output rail, else our flows compiled once from NeMo's parse
    # (app/guard/compiled.py), else NeMo LLMRails; "compiled": the same without IORails; "nemo": always
    # NeMo LLMRails.check_async.
    rails_engine: Literal["auto", "compiled", "nemo"] = "auto"
    guard_url: str | None = None
    guard_model: str | None = None
    guard_api_key: SecretStr | None = None
    guard_timeout_s: float = 10.0
    # The embedded (CPU) judge reads at most this much of a conversation (head and tail of an over-long
    # message): a long jailbreak template otherwise takes 6-30 s to judge. A remote Llama Guard reads all.
    guard_judge_max_chars: int = Field(default=1200, ge=200)
    guard_fail_open: bool = Field(
        default=False, description="Development only: let turns through when a guard cannot run"
    )
    output_rails_chunk_chars: int = 200
    # Streaming only: the first hold-back window; 1 = the first token alone, so TTFT pays one output check and
    # no extra generation. Then 40 chars, doubling up to output_rails_chunk_chars. Every window is checked.
    output_rails_first_chunk_chars: int = Field(default=1, ge=1)
    output_rails_context_chars: int = 400

    # --- retrieval ---
    # Where MiniLM embeds (queries and ingestion): "auto" = CUDA when torch sees a device, else the CPU (logged);
    # "cuda" fails fast without one (app/rag/embedder.py select_device).
    embed_device: Literal["auto", "cpu", "cuda"] = "auto"
    rag_enabled: bool = True
    rag_top_k: int = 3
    rag_score_threshold: float = 0.3
    # POST /v1/search's gate (a request's `threshold` overrides it). 0: the k best chunks for any query, as a search
    # API returns them — the chat keeps rag_score_threshold, whose abstention is an instant "I don't know". With the
    # chat's gate, /v1/search returned nothing for answerable questions whose best cosine was 0.26-0.29 (docs/rag.md).
    rag_search_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    # Once the query passed rag_score_threshold, each chunk needs only this dense cosine (app/rag/retrieve.py).
    rag_chunk_floor: float = Field(default=0.15, ge=0.0, le=1.0)
    rag_context_tokens: int = 900  # prompt eval dominates CPU latency: ~60 tok/s for qwen2.5-1.5b on 2 cores
    # "passages": the sentences/rows of the retrieved chunks that answer the question, in a budget between
    # rag_context_min_tokens and rag_context_tokens that adapts to it (app/rag/passages.py); "chunks": whole chunks
    # up to rag_context_tokens. Passages cut a grounded prompt's tokens (and so CPU time to first token) ~2x.
    # "pages": the whole answer page of the top chunk (its document, or a run of its chunks within rag_context_tokens)
    # after the fixed instructions, so llama.cpp's prompt cache reads it once and each question reads only itself
    # (app/rag/pages.py); a page not read yet (app/llm/page_warmer.py) gets the passages prompt meanwhile.
    rag_context_mode: Literal["passages", "chunks", "pages"] = "pages"
    rag_context_min_tokens: int = Field(default=120, ge=20)
    # Passages of other pages after the page (uncached tokens), only from retrieved chunks whose dense cosine is
    # within rag_page_extra_margin of the best retrieved chunk's: a close call between two documents (docs/rag.md).
    rag_page_extra_tokens: int = Field(default=0, ge=0)
    rag_page_extra_margin: float = Field(default=0.05, ge=0.0, le=2.0)
    # With pages and the embedded LLM: read every page into the prompt cache in the background while idle (off: only
    # the pages turns asked for).
    rag_warm_pages: bool = True
    query_rewrite: Literal["join", "llm"] = "join"
    # A second look when the model answers "I don't know" while a prompt passage holds this share of the question's
    # idf-weighted terms (app/rag/second_look.py). Mode "auto": the answer is started for the model ("According to
    # source [n],") where the backend continues an assistant message (llama.cpp), else a short follow-up turn.
    rag_second_look: bool = True
    rag_second_look_coverage: float = Field(default=0.3, ge=0.0, le=1.0)
    rag_second_look_mode: Literal["auto", "prefill", "follow_up"] = "auto"
    # A first answer that names a rare word of the question no passage holds ("Yes, you can mail it to France.") and
    # states no source figure becomes the "I don't know" text (app/rag/second_look.py `Plan.vet_first`). Off by default:
    # it won two unanswerable dev tasks (the ones it was built on) but on the test half it turned a right follow-up into
    # "I don't know" and won nothing, and it holds the first sentence of such answers (TTFT p50 +0.9 s); docs/rag.md.
    rag_first_answer_vet: bool = False

    ingest_max_file_bytes: int = 20_000_000
    # MiniLM weights precision. "auto": float32 for the server's queries on the CPU (rails compare their vectors: the
    # same verdict on every CPU), bfloat16 for ingestion where the CPU has native bf16 (AVX512-BF16/AMX: ~3x
    # faster, cosine to fp32 > 0.9999), float16 on CUDA.
    embed_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # MiniLM runtime: "auto" = OpenVINO when installed (same vectors, ~2-3x faster on CPU), else PyTorch.
    embed_engine: Literal["auto", "openvino", "torch"] = "auto"
    # OpenVINO threads for the server's MiniLM (0 = all cores). Measured on 2 cores (docs/benchmarks.md): 2 threads
    # cut a turn from ~24 to ~19-21 ms p50 at concurrency 1, for ~8% fewer turns/s at concurrency 32 than 1 thread.
    embed_threads: int = Field(default=2, ge=0)
    # Bulk ingestion's MiniLM: "auto" = int8 (OpenVINO + NNCF, ~1.6x faster, cosine ~0.997 to fp32) when
    # available, else the query embedder; "int8" insists; "same" = the query embedder (bf16/fp32).
    embed_ingest_precision: Literal["auto", "int8", "same"] = "auto"
    # MiniLM reads at most 256 word pieces; ~900 characters of English stay under that, so a chunk's
    # embedding covers all of its text (the groundedness rail reuses those embeddings).
    rag_chunk_chars: int = 900
    rag_chunk_overlap: int = 120
    rag_exact_max_vectors: int = 5_000  # exact FAISS index up to this many chunks, HNSW above (app/rag/index.py)
    rag_hnsw_ef_search: int = 128
    rag_bm25_weight: float = 1.0  # weight of the keyword list in reciprocal-rank fusion

    # --- auth and limits ---
    api_keys: SecretList = Field(
        default_factory=list, description="Chat API keys; empty = no auth (loopback only)"
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Admin token; generated and printed once when unset"
    )
    rate_limit: str | None = Field(default=None, description="Per-key rate limit, e.g. '60/minute'")
    cors_origins: StrList = Field(default_factory=list)
    docs_enabled: bool = True
    max_body_bytes: int = 1_000_000
    max_message_chars: int = 16_000
    max_messages: int = 200
    shutdown_grace_s: float = 30.0

    rails_poll_interval_s: float = 1.0  # replicas poll the rails version store this often (pub/sub is faster)

    # --- UI ---
    ui_enabled: bool = True
    ui_secret: SecretStr | None = Field(
        default=None, description="Key for the browser-kept session id; set it so chats survive restarts"
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        """A URL the app cannot use stops it at start with the reason (never the password), not a traceback."""
        if value is None or not value.strip():
            return None
        if value.strip().lower() == "auto":
            return value
        from app.redis_client import parse_redis_url

        parse_redis_url(value)  # RedisURLError is a ValueError: pydantic reports it as this setting's error
        return value

    @property
    def lora_adapter_names(self) -> list[str]:
        """Allowed adapter names (entries are "name" or "name=path")."""
        return [entry.split("=", 1)[0] for entry in self.lora_adapters]

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"


@lru_cache
def get_settings() -> Settings:
    return Settings()

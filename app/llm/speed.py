"""Say what the machine can do: the embedded LLM's prompt and decode speed, measured once at start.

On a slow CPU (a 2-core AVX2 EPYC reads ~17 prompt tokens/s with the default 1.5B model) a grounded answer takes
30-50 s to start, and nothing else tells the user why. After startup, one short fixed request to the embedded
llama.cpp server measures both speeds from the `timings` object it returns; one INFO line reports them and the
estimated time to first token of a grounded prompt, and a WARNING names the faster model setting when that
estimate is too long. Nothing is switched: the user decides. With answer pages (the default) both times are said:
a question whose page is not in llama.cpp's prompt cache yet reads the passages (~510 tokens: ~18 s on a 2-core
AVX2 Zen 3), one whose page is reads only itself (~40 tokens: ~1.5 s there), and the pages are read in the
background while the server is idle (35 shipped pages, ~25,400 tokens: ~15 min at 29 tokens/s).

The probe runs in a daemon thread started by the app's lifespan once the state is built (app/main.py), so it
neither delays readiness nor competes with startup's own CPU work (which would understate the speed). Any
failure is logged and forgotten: the probe never stops the server.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from app.llm.embedded import EmbeddedLLMServer
    from app.settings import Settings

log = logging.getLogger(__name__)

# ~200 tokens of ordinary English: long enough that prompt_per_second is a per-token rate rather than fixed
# overhead, short enough to take ~12 s even at 17 tokens/s.
PROBE_PROMPT = (
    "Larkspur Bank customer-support reference note. A debit card can be frozen and unfrozen at any time in the "
    "mobile app under Cards, then Manage card. Freezing stops new purchases and cash withdrawals but lets "
    "recurring payments, refunds and deposits through. A card that is lost or stolen should be reported at once "
    "so that it can be cancelled and replaced; the replacement usually arrives within five to seven business "
    "days, and an expedited card can be requested for a fee. Daily limits apply to ATM withdrawals and to "
    "point-of-sale purchases, and they can be reviewed in the app or by calling support. Transfers between "
    "accounts at the bank are instant; external transfers by ACH take one to three business days, and wires sent "
    "before the daily cut-off arrive the same day. A disputed card transaction must be reported within sixty "
    "days of the statement on which it first appeared. Summarise this note in one short sentence:"
)
PROBE_PREDICT_TOKENS = 16  # enough for a decode rate; ignore_eos makes the model write all of them
PROBE_TIMEOUT_S = 90.0  # the whole probe; it runs in the background, so this bounds only the thread's life
SLOW_TTFT_S = 15.0  # an estimated time to first token above this gets a WARNING

# A grounded prompt = the shipped system prompt and rules (244 Qwen tokens) + chat template + question (~270),
# plus sources: the smaller of the context budget and top_k full chunks (knowledge/ reads 4.08 chars a token).
PROMPT_OVERHEAD_TOKENS = 270
CHARS_PER_TOKEN = 4.0
# Once a question's answer page is in llama.cpp's prompt cache (answer pages, app/rag/pages.py), the question and
# its turn's template tokens are all it reads: ~15-40 tokens (docs/rag.md "Answer pages"); the upper end.
WARM_PAGE_PROMPT_TOKENS = 40
# The next smaller embedded model; a model not listed has no faster sibling to suggest.
FASTER_MODEL = {"qwen2.5-1.5b": "qwen2.5-0.5b"}


@dataclass(frozen=True)
class LLMSpeed:
    """What one probe measured: llama.cpp's own timings, so HTTP and queueing are not counted."""

    prompt_tps: float  # prompt tokens read per second
    decode_tps: float  # tokens generated per second
    prompt_tokens: int  # prompt tokens the probe actually evaluated (not served from the KV cache)

    def ttft_s(self, prompt_tokens: int) -> float:
        """Estimated time to first token for a prompt of `prompt_tokens`: read it all, then decode one token."""
        return prompt_tokens / self.prompt_tps + 1.0 / self.decode_tps


def grounded_prompt_tokens(settings: Settings) -> int:
    """Prompt tokens of a typical grounded answer under these settings (~510 with the defaults). Whole chunks:
    the smaller of the budget and top_k chunks. Passages (the default): about twice the minimum budget, which
    grows with the question (whole prompts measured 488-529 Qwen tokens on the task sets: docs/benchmarks.md)."""
    full_chunks = settings.rag_top_k * math.ceil(settings.rag_chunk_chars / CHARS_PER_TOKEN)
    sources = min(settings.rag_context_tokens, full_chunks)
    if settings.rag_context_mode != "chunks":  # pages: a page not read yet gets the passages (what this estimates)
        sources = min(sources, 2 * settings.rag_context_min_tokens)
    return PROMPT_OVERHEAD_TOKENS + sources


class SpeedProbe:
    """One fixed completion against a llama.cpp server's OpenAI base URL (http://host:port/v1).

    `cache_prompt: false` plus a unique first line keep the prompt (KV) cache from serving the prompt, which would
    report the speed of a cache lookup. `abort()`, from any thread, cuts the connection: llama.cpp's teardown
    (EmbeddedLLMServer.close) waits for the clients of open requests to leave while holding the GIL, so a probe
    still waiting for its answer would hang the shutdown. Plain http.client because its socket is reachable
    (and loopback must not go through a proxy from the environment).
    """

    def __init__(self, base_url: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the speed probe needs an http:// base URL, not {base_url!r}")
        self.timeout_s = timeout_s
        self._path = parts.path.rstrip("/") + "/completions"
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
        self._lock = threading.Lock()
        self._aborted = False

    def run(self) -> LLMSpeed:
        """Raises OSError (TimeoutError included) or http.client.HTTPException on transport errors, ValueError on
        an HTTP error or a reply without llama.cpp's `timings`."""
        body = {
            "prompt": f"[probe {time.time_ns()}]\n{PROBE_PROMPT}",
            "max_tokens": PROBE_PREDICT_TOKENS,
            "temperature": 0.0,
            "cache_prompt": False,
            "ignore_eos": True,  # always PROBE_PREDICT_TOKENS tokens, so the decode rate is not one token's
        }
        try:
            self._conn.connect()
            with self._lock:  # an abort() during connect() found no socket to cut
                if self._aborted:
                    raise ConnectionAbortedError("the speed probe was aborted")
            self._conn.request("POST", self._path, json.dumps(body), {"Content-Type": "application/json"})
            response = self._conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            if self._aborted:  # say why the connection went, rather than "remote end closed connection"
                raise ConnectionAbortedError("the embedded LLM server stopped during the speed probe") from exc
            raise
        finally:
            self._conn.close()
        if response.status != 200:
            raise ValueError(f"the LLM server answered HTTP {response.status}: {raw[:200]!r}")
        return _parse_timings(raw)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read; llama.cpp sees the client leave


def _parse_timings(raw: bytes) -> LLMSpeed:
    payload = json.loads(raw)
    timings: Any = payload.get("timings") if isinstance(payload, dict) else None
    try:
        speed = LLMSpeed(
            prompt_tps=float(timings["prompt_per_second"]),
            decode_tps=float(timings["predicted_per_second"]),
            prompt_tokens=int(timings["prompt_n"]),
        )
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"the LLM server's reply has no usable llama.cpp timings: {timings!r}") from exc
    if not (speed.prompt_tps > 0 and speed.decode_tps > 0):
        raise ValueError(f"the LLM server reported non-positive speeds: {timings!r}")
    return speed


def measure_speed(base_url: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> LLMSpeed:
    """Measure a llama.cpp server's prompt and decode speed once; `base_url` is its OpenAI base URL."""
    return SpeedProbe(base_url, timeout_s=timeout_s).run()


def _advice(model_name: str) -> str:
    faster = FASTER_MODEL.get(model_name)
    remote = "or serve the LLM from a GPU (GUARDCHAT_LLM_BACKEND, see README 'Production backends')"
    if faster:
        return f"For faster answers set GUARDCHAT_EMBEDDED_MODEL={faster} (smaller, weaker answers), {remote}."
    return f"For faster answers lower GUARDCHAT_RAG_CONTEXT_TOKENS (fewer source tokens to read), {remote}."


def report_speed(
    speed: LLMSpeed,
    *,
    model_name: str,
    prompt_tokens: int,
    threshold_s: float = SLOW_TTFT_S,
    warm_prompt_tokens: int | None = None,
) -> float:
    """Log the speeds and the estimated time to first token (INFO), and a WARNING with the faster setting when the
    estimate exceeds `threshold_s`. Returns the estimate. `warm_prompt_tokens` (answer pages): what a question reads
    once its page is cached — both times are said, since on a slow CPU they differ ten-fold."""
    estimate = speed.ttft_s(prompt_tokens)
    warm = None if warm_prompt_tokens is None else speed.ttft_s(warm_prompt_tokens)
    # Also as JSON log fields, for whoever collects the logs.
    fields = {
        "prompt_tps": round(speed.prompt_tps, 1),
        "decode_tps": round(speed.decode_tps, 1),
        "ttft_estimate_s": round(estimate, 1),
    }
    if warm is not None:
        fields["ttft_estimate_warm_page_s"] = round(warm, 1)
    once_read = "" if warm is None else f", ~{warm:.1f} s once its answer page is read ({warm_prompt_tokens} tokens)"
    log.info(
        "embedded LLM %s on this machine: reads prompts at %.0f tokens/s, writes %.1f tokens/s; "
        "a grounded answer (~%d prompt tokens) starts after ~%.1f s%s",
        model_name, speed.prompt_tps, speed.decode_tps, prompt_tokens, estimate, once_read,
        extra=fields,
    )
    if estimate > threshold_s:
        until = "" if warm is None else (
            " until its answer page is read (the pages are read in the background while the server is idle: "
            f"/readyz answer_pages), ~{warm:.1f} s after that"
        )
        log.warning(
            "Slow machine for %s: a grounded answer will take ~%.0f s to start (reading ~%d prompt tokens at "
            "%.0f tokens/s)%s. %s",
            model_name, estimate, prompt_tokens, speed.prompt_tps, until, _advice(model_name),
            extra=fields,
        )
    return estimate


def probe_and_report(
    probe: SpeedProbe,
    *,
    model_name: str,
    prompt_tokens: int,
    threshold_s: float = SLOW_TTFT_S,
    warm_prompt_tokens: int | None = None,
) -> LLMSpeed | None:
    """Run the probe and report_speed; never raises (a probe that fails says so and the server goes on)."""
    try:
        speed = probe.run()
    except TimeoutError:
        # Not finishing ~200 prompt tokens in time is itself the answer: the machine is far too slow.
        log.warning(
            "Slow machine for %s: the speed probe (~200 prompt tokens) did not finish in %.0f s, so a grounded "
            "answer (~%d prompt tokens) will take minutes to start. %s",
            model_name, probe.timeout_s, prompt_tokens, _advice(model_name),
        )
        return None
    except Exception as exc:  # any failure: a diagnostic must never stop the server
        log.info("could not measure the embedded LLM's speed (%s); going on without it", exc)
        return None
    report_speed(speed, model_name=model_name, prompt_tokens=prompt_tokens, threshold_s=threshold_s,
                 warm_prompt_tokens=warm_prompt_tokens)  # fmt: skip
    return speed


def start_speed_probe(server: EmbeddedLLMServer | None, settings: Settings) -> threading.Thread | None:
    """Probe `server` in a daemon thread and keep the result on `server.speed`. None (no thread) without a running
    embedded server: remote backends are someone else's machine."""
    if server is None or not server.running:
        return None
    probe = SpeedProbe(server.base_url)
    prompt_tokens = grounded_prompt_tokens(settings)
    warm = WARM_PAGE_PROMPT_TOKENS if settings.rag_context_mode == "pages" else None

    def run() -> None:
        server.speed = probe_and_report(
            probe, model_name=server.model_name, prompt_tokens=prompt_tokens, warm_prompt_tokens=warm
        )

    def stop() -> None:  # a shutdown during the probe: cut it, then give the thread a moment to let go
        probe.abort()
        thread.join(timeout=2.0)

    thread = threading.Thread(target=run, name="guardchat-llm-speed", daemon=True)
    server.on_close(stop)
    thread.start()
    return thread

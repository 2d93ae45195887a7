"""Runs the real guardchat app (app.main.create_app, settings from GUARDCHAT_* env) under uvicorn for
the benchmarks, optionally with the micro-batching embedder (app/rag/batching.py) wrapped around the
process embedder, so its effect can be measured without changing the app:

    GUARDCHAT_... python -m bench.serve --port 8000 [--batching] [--loop asyncio --http h11]
"""

from __future__ import annotations

import argparse
import functools

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batching", action="store_true", help="wrap the embedder in BatchingEmbedder")
    parser.add_argument("--loop", default="auto")
    parser.add_argument("--http", default="auto")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (sessions must be in Redis)")
    args = parser.parse_args()

    if args.workers > 1:  # separate processes: each builds its own state from the GUARDCHAT_* environment
        uvicorn.run(
            "app.main:create_app", factory=True, workers=args.workers, host="127.0.0.1", port=args.port,
            log_level="warning", access_log=False, loop=args.loop, http=args.http, lifespan="on",
        )
        return

    if args.batching:
        import app.rag.embedder as embedder_module
        from app.rag.batching import BatchingEmbedder

        original = embedder_module.get_embedder

        @functools.lru_cache(maxsize=1)
        def batched() -> BatchingEmbedder:
            return BatchingEmbedder(original())

        # build_state imports get_embedder at call time, so every component gets the batching one.
        embedder_module.get_embedder = batched  # type: ignore[assignment]

    from app.main import create_app

    uvicorn.run(
        create_app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
        loop=args.loop, http=args.http, lifespan="on",
    )


if __name__ == "__main__":
    main()

"""Runs the real guardchat app (app.main.create_app, settings from GUARDCHAT_* env) under uvicorn for
the benchmarks (the app always micro-batches its query embeddings: app/rag/batching.py):

    GUARDCHAT_... python -m bench.serve --port 8000 [--loop asyncio --http h11] [--workers N]
"""

from __future__ import annotations

import argparse

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
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

    from app.main import create_app

    uvicorn.run(
        create_app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
        loop=args.loop, http=args.http, lifespan="on",
    )


if __name__ == "__main__":
    main()

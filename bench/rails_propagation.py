"""How long a rails publish on replica A takes to be served by replica B (issue 16 item 4: within 1 s).

Two real `guardchat` processes (bench/serve.py) on one Redis, each with its own DATA_DIR, a unique key
prefix, RAG off and the instant fake backends (bench/fake_backends.py) as the chat LLM and Llama Guard.
Each run edits the live config on A (`PUT /admin/api/rails`), then polls B's `/admin/api/rails/status`
every 10 ms until B serves the new version. Two kinds of edit, alternating:

- `comment`: a comment appended to config.yml (nothing the guard reads changes);
- `refusal`: the investment-advice refusal text in texts.co is reworded (a real edit).

Reported per edit kind: `put_s` (the PUT's own latency on A), `b_after_put_s` (from A's 200 to B serving:
the issue's "reaches every replica within 1 s") and `b_after_request_s` (from sending the PUT).

    python -m bench.rails_propagation [--runs 6] [--redis-url redis://127.0.0.1:6379/0]

To compare with older code, copy this file into a worktree of that code and run it there (the replicas
are started from the checkout the script lives in).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.common import PROJECT_ROOT, PYTHON, Child, free_port, print_table, start_child, summarize, write_result
from bench.stack import Backends, start_backends

ADMIN_TOKEN = "bench-admin-" + uuid.uuid4().hex
SHARED_DATA = ("models", "cache")  # converted model graphs: link them instead of converting again per replica
REFUSAL = re.compile(r'(define bot refuse investment advice\n  )"[^"\n]*"')


def replica_data_dir(root: Path, name: str, shared: Path) -> Path:
    data_dir = root / f"data-{name}"
    data_dir.mkdir(parents=True)
    for sub in SHARED_DATA:
        source = shared / sub
        if source.exists():
            (data_dir / sub).symlink_to(source)
    return data_dir


def start_replica(
    name: str, backends: Backends, redis_url: str, prefix: str, data_dir: Path, **extra_env: str
) -> Child:
    env = {
        "GUARDCHAT_LLM_BACKEND": "openai",
        "GUARDCHAT_LLM_URL": backends.llm.url + "/v1",
        "GUARDCHAT_LLM_MODEL": "fake-llm",
        "GUARDCHAT_GUARD_BACKEND": "openai",
        "GUARDCHAT_GUARD_URL": backends.guard.url + "/v1",
        "GUARDCHAT_GUARD_MODEL": "llama-guard",
        "GUARDCHAT_RAG_ENABLED": "false",
        "GUARDCHAT_DATA_DIR": str(data_dir),
        "GUARDCHAT_REDIS_URL": redis_url,
        "GUARDCHAT_REDIS_KEY_PREFIX": prefix,
        "GUARDCHAT_ADMIN_TOKEN": ADMIN_TOKEN,
        "GUARDCHAT_UI_ENABLED": "false",
        "GUARDCHAT_LOG_LEVEL": "warning",
        **extra_env,
    }
    port = free_port()
    return start_child(
        f"replica-{name}",
        [PYTHON, "-m", "bench.serve", "--port", str(port)],
        port,
        env=env,
        ready_path="/readyz",
        timeout=600,
    )


def edited(files: dict[str, str], kind: str, run: int) -> dict[str, str]:
    """The live config without its rails tests (they judge the fake LLM, not propagation), edited."""
    files = {path: text for path, text in files.items() if not path.startswith("tests/")}
    if kind == "comment":
        files["config.yml"] = files["config.yml"].rstrip("\n") + f"\n# propagation run {run}\n"
    else:
        text = f"Sorry, I can't advise on investments (run {run}). Ask me about your accounts instead."
        files["texts.co"], replaced = REFUSAL.subn(rf'\g<1>"{text}"', files["texts.co"])
        assert replaced == 1, "texts.co has no `define bot refuse investment advice` text"
    return files


def publish_and_wait(a: httpx.Client, b: httpx.Client, kind: str, run: int, timeout_s: float = 60) -> dict[str, Any]:
    live = a.get("/admin/api/rails").json()
    body = {"base_version": live["version"], "files": edited(live["files"], kind, run), "message": f"bench {kind}"}
    sent = time.monotonic()
    response = a.put("/admin/api/rails", json=body)
    answered = time.monotonic()
    response.raise_for_status()
    version = str(response.json()["version"])
    polls = 0
    while True:
        status = b.get("/admin/api/rails/status").json()
        polls += 1
        if status["serving_version"] == version:
            break
        if time.monotonic() - answered > timeout_s:
            raise TimeoutError(f"B still serves {status['serving_version']} {timeout_s}s after version {version}")
        time.sleep(0.01)
    served = time.monotonic()
    return {
        "kind": kind,
        "version": int(version),
        "put_s": answered - sent,
        "b_after_put_s": served - answered,
        "b_after_request_s": served - sent,
        "b_polls": polls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6, help="publishes (alternating comment / refusal edits)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--label", default="", help="names the result file (e.g. 'baseline')")
    parser.add_argument(
        "--shared-data",
        type=Path,
        default=PROJECT_ROOT / "data",
        help="a DATA_DIR whose models/ and cache/ the replicas link to",
    )
    args = parser.parse_args()

    prefix = f"bench-propagation-{uuid.uuid4().hex[:8]}:"
    root = Path(tempfile.mkdtemp(prefix="bench-propagation-"))
    backends = start_backends()
    replicas: list[Child] = []
    try:
        for name in ("a", "b"):
            replicas.append(
                start_replica(name, backends, args.redis_url, prefix, replica_data_dir(root, name, args.shared_data))
            )
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        a_url, b_url = replicas[0].url, replicas[1].url
        with (
            httpx.Client(base_url=a_url, headers=headers, timeout=300) as a,
            httpx.Client(base_url=b_url, headers=headers, timeout=30) as b,
        ):
            runs = [publish_and_wait(a, b, ("comment", "refusal")[i % 2], i) for i in range(args.runs)]
    finally:
        for child in replicas:
            child.stop()
        backends.stop()
        _delete_keys(args.redis_url, prefix)
    rows, summary = [], {}
    for kind in ("comment", "refusal"):
        mine = [r for r in runs if r["kind"] == kind]
        summary[kind] = {
            key: summarize([r[key] for r in mine]) for key in ("put_s", "b_after_put_s", "b_after_request_s")
        }
        rows.append(
            [
                kind,
                len(mine),
                *(
                    summary[kind][k][stat]
                    for k in ("put_s", "b_after_put_s", "b_after_request_s")
                    for stat in ("p50", "max")
                ),
            ]
        )
    print_table(
        [
            "edit",
            "n",
            "PUT p50 s",
            "PUT max s",
            "B after 200 p50 s",
            "B after 200 max s",
            "B after request p50 s",
            "B after request max s",
        ],
        rows,
        title="rails publish A -> served by B",
    )
    write_result("rails_propagation" + (f"-{args.label}" if args.label else ""), {"runs": runs, "summary": summary})


def _delete_keys(redis_url: str, prefix: str) -> None:
    from redis import Redis

    client = Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


if __name__ == "__main__":
    main()

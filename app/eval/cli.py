"""`guardchat eval safety|topic|rag|all`: the typer sub-app. app/cli.py mounts it with
`app.add_typer(eval_app, name="eval")`. Heavy imports stay inside the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

eval_app = typer.Typer(help="Evaluations (JSON + Markdown + PNG charts into --out).", no_args_is_help=True)

DataOpt = Annotated[list[Path] | None, typer.Option("--data", help="Labelled JSONL (repeatable)")]
ServerOpt = Annotated[str | None, typer.Option(help="Evaluate a running server (base URL) instead of in-process")]
OutOpt = Annotated[Path, typer.Option(help="Report directory")]
LimitOpt = Annotated[int | None, typer.Option(help="Rows per data file")]
KeyOpt = Annotated[str | None, typer.Option(envvar="GUARDCHAT_CLIENT_API_KEY", help="API key for --server")]


def _settings() -> Any:
    from app.settings import Settings

    return Settings()


def _finish(report: dict[str, Any], out: Path) -> None:
    typer.echo(report.get("markdown") or json.dumps(report, indent=2, default=str))
    typer.secho(f"report written to {out}/", fg="green", err=True)


@eval_app.command("safety")
def eval_safety(data: DataOpt = None, server: ServerOpt = None, out: OutOpt = Path("eval-report"),
                limit: LimitOpt = None, api_key: KeyOpt = None) -> None:
    """Block rate (harmful / jailbreak / malicious rows) and false-refusal rate (benign rows), overall, per
    label, category and rail; confusion matrix; guard latency p50/p95/p99; the misses."""
    from app.eval.runner import run_guard_eval

    _finish(run_guard_eval("safety", list(data or []), _settings(), server=server, out_dir=out, limit=limit,
                           api_key=api_key), out)


@eval_app.command("topic")
def eval_topic(data: DataOpt = None, server: ServerOpt = None, out: OutOpt = Path("eval-report"),
               limit: LimitOpt = None, api_key: KeyOpt = None) -> None:
    """Topical rail: off-topic / investment / legal / tax requests refused, on-domain questions allowed
    (default data: the shipped app/eval/data/topic_dev.jsonl)."""
    from app.eval.runner import run_guard_eval

    _finish(run_guard_eval("topic", list(data or []), _settings(), server=server, out_dir=out, limit=limit,
                           api_key=api_key), out)


@eval_app.command("rag")
def eval_rag(
    data: DataOpt = None,
    server: ServerOpt = None,
    out: OutOpt = Path("eval-report"),
    limit: Annotated[int | None, typer.Option(help="First N tasks per data file (after --kind/--split)")] = None,
    api_key: KeyOpt = None,
    k: Annotated[int, typer.Option(help="Retrieval depth for recall@k / MRR")] = 5,
    answers: Annotated[bool, typer.Option(help="Also run every task's turns end to end (real turn pipeline)")] = True,
    retrieval: Annotated[bool, typer.Option(help="Retrieval metrics (recall@k, MRR) on the one-turn tasks")] = True,
    kind: Annotated[list[str] | None, typer.Option(help="Only tasks of this kind (repeatable): single, fees, "
                                                        "alarming, followup, conversation, unanswerable")] = None,
    split: Annotated[str | None, typer.Option(help="dev or test: the sha1-parity half of each task file")] = None,
    judge: Annotated[bool, typer.Option(help="LLM-as-judge answer correctness with the configured LLM")] = False,
    unanswerable: Annotated[Path | None, typer.Option(help="Off-domain question/context set (e.g. "
                                                           "../shared/eval/unanswerable_dev.jsonl)")] = None,
    rescore: Annotated[Path | None, typer.Option(help="Score a run's rag_turns.jsonl again; runs no turn")] = None,
) -> None:
    """recall@k, MRR (hybrid vs dense vs BM25); per task kind: correct, "I don't know", refusals (which rail),
    citations, TTFT p50/p95, unsupported facts per 100 answers (default tasks: tests/data/rag_tasks.jsonl).
    A progress line per task goes to stderr."""
    from app.eval.runner import run_rag_eval

    if rescore is not None:
        from app.eval.rag import rescore as rescore_run

        _finish(rescore_run(rescore, _settings(), out), out)
        return
    if split not in (None, "dev", "test"):
        raise typer.BadParameter("--split must be dev or test")
    _finish(run_rag_eval(list(data or []), _settings(), server=server, out_dir=out, limit=limit, api_key=api_key,
                         k=k, answers=answers, judge=judge, unanswerable=unanswerable, retrieval=retrieval,
                         kinds=list(kind or []) or None, split=split), out)


@eval_app.command("all")
def eval_all(data: DataOpt = None, server: ServerOpt = None, out: OutOpt = Path("eval-report"),
             limit: LimitOpt = None, api_key: KeyOpt = None,
             rag_data: Annotated[list[Path] | None, typer.Option("--rag-data", help="RAG tasks JSONL")] = None) -> None:
    """safety (on --data), topic (shipped set) and rag, with an index.md."""
    from app.eval.runner import run_all

    _finish(run_all(list(data or []), _settings(), server=server, out_dir=out, limit=limit, api_key=api_key,
                    rag_data=list(rag_data or [])), out)

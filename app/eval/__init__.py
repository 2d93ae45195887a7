"""Evaluation: safety and topic evals of the rails, the RAG eval, their reports and charts.

- `eval_guard(guard, embedder, rows)` — in-process eval of one guard (the admin console uses it for drafts);
- `app.eval.runner.run_guard_eval / run_rag_eval / run_all` — the `guardchat eval ...` commands;
- `app.eval.cli.eval_app` — the typer sub-app for those commands.
"""

from app.eval.guard_eval import eval_guard, summarize
from app.eval.report import render_guard_markdown, write_guard_report

__all__ = ["eval_guard", "render_guard_markdown", "summarize", "write_guard_report"]

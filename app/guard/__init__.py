"""The safety layer: NeMo Guardrails flows around our own actions (detector, Llama Guard 3).

NeMo Guardrails reports usage statistics by default; the environment must say no before anything
imports it, and everything under app/guard imports this package first."""

import os

os.environ.setdefault("NEMO_GUARDRAILS_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

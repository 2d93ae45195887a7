"""`guardchat guard train`: fit the stage-1 detector heads (app/guard/detector.py) on MiniLM embeddings.

Data: the public dev sets in ../shared/eval (harmful requests, jailbreak templates, chit-chat,
system-prompt extraction, SQuAD-style questions) plus our own rows in app/guard/training_data/.
Method: class-balanced logistic regression per head (scikit-learn here only; inference is numpy),
Platt-calibrated on grouped k-fold out-of-fold scores; thresholds are chosen from those same
out-of-fold scores. Jailbreak templates are wrapped around harmful requests only within a fold,
and near-duplicate texts share a fold, so a fold never sees its own templates or requests.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.guard.detector import (
    DEFAULT_WEIGHTS_DIR,
    LEXICAL_FEATURES,
    LLAMA_GUARD_CATEGORIES,
    MAX_WINDOWS,
    TOPIC_LABELS,
    WEIGHTS_STEM,
    WINDOW_STRIDE,
    WINDOW_WORDS,
    build_features,
    text_windows,
)
from app.guard.train_data import EvalItem, build_items

TRAINING_DATA_DIR = Path(__file__).resolve().parent / "training_data"
CATEGORY_LABELS = list(LLAMA_GUARD_CATEGORIES)
C_REG = 4.0
TARGETS = {"harmful_recall": 0.98, "benign_frr": 0.01, "on_domain_topic_refusal": 0.03}

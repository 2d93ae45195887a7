"""Offline training of the guard (not imported by the server): the fine-tuned guard model (`finetune*.py`, run by
`guardchat guard train`) and the earlier linear detector (`train*.py`), their rows (`data/`, with ../shared/eval and
the knowledge base) and their reports. The runtime loads only what they write: app/guard/weights/."""

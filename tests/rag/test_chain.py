from __future__ import annotations

from app.rag.base import Chunk
from app.rag.chain import PROMPT_CHAIN, approx_tokens, build_messages, cited_numbers, extract_citations

SYSTEM = "You are Larkspur Bank's assistant."


def _chunk(n: int, content: str, **kw: object) -> Chunk:
    return Chunk(
        id=f"d{n}#0:x",
        document_id=f"doc{n}",
        source=f"doc{n}.md",
        title=f"Title {n}",
        content=content,
        section=str(kw.get("section", f"Section {n}")),
        page=kw.get("page"),
        score=0.5 + n / 100,
    )  # type: ignore[arg-type]


def test_stable_prefix_and_numbered_sources() -> None:
    history = [
        {"role": "system", "content": "client-supplied system text is not kept"},
        {"role": "user", "content": "Hi, what about wires?"},
        {"role": "assistant", "content": "Wires cost $25 [1]."},
    ]
    chunks = [_chunk(1, "Domestic wires cost $25 {not a template}."), _chunk(2, "Savings earn 3.1% APY.", page=4)]
    one = build_messages("And international ones?", history, chunks, system_prompt=SYSTEM, context_tokens=500)
    other = build_messages("Totally different?", [], chunks[::-1], system_prompt=SYSTEM, context_tokens=500)

    assert [m["role"] for m in one.messages] == ["system", "user", "assistant", "user"]
    system = one.messages[0]["content"]
    assert system.startswith(SYSTEM)
    # Everything before the sources is identical across turns: the backend's prompt cache is reused.
    prefix = system[: system.index("Sources:")]
    assert other.messages[0]["content"].startswith(prefix) and "[1]" in prefix  # the rules show the citation form
    assert "[1] Title 1 — Section 1\nDomestic wires cost $25 {not a template}." in system
    assert "[2] Title 2 — Section 2 (page 4)\nSavings earn 3.1% APY." in system
    assert system.index("[1] Title 1") < system.index("[2] Title 2")
    assert one.messages[-1] == {"role": "user", "content": "And international ones?"}
    assert one.sources == chunks and not one.no_context
    # The prompt is exactly what the LCEL chain makes of the same variables.
    assert one.messages == PROMPT_CHAIN.invoke(one.variables)
    assert other.messages == PROMPT_CHAIN.invoke(other.variables)
    assert (
        PROMPT_CHAIN.invoke({"instructions": "x", "sources": "y", "history": [], "question": "q"})[-1]["content"] == "q"
    )


def test_context_budget_and_no_context() -> None:
    long = " ".join(["word"] * 400)
    chunks = [_chunk(i, long) for i in range(1, 6)]
    prepared = build_messages("q", [], chunks, system_prompt=SYSTEM, context_tokens=900)
    assert 1 <= len(prepared.sources) < 5 and prepared.context_tokens <= 900
    assert f"[{len(prepared.sources)}]" in prepared.messages[0]["content"]
    assert f"[{len(prepared.sources) + 1}]" not in prepared.messages[0]["content"].split("Sources:")[1]
    assert approx_tokens("one two three four five six seven eight nine ten") == 13

    empty = build_messages("Who won the cup?", [], [], system_prompt=SYSTEM, context_tokens=900)
    assert empty.no_context and empty.sources == []


def test_extract_citations_returns_only_cited_sources() -> None:
    chunks = [_chunk(i, f"Fact number {i} about fees and limits.") for i in range(1, 5)]
    answer = "Wires cost $25 [2]. Savings pay 3% [2][4], and see [1, 2]. Ignore [9] and [0]."
    assert cited_numbers(answer) == [2, 4, 1, 9, 0]
    citations = extract_citations(answer, chunks)
    assert [c["id"] for c in citations] == [2, 4, 1]
    assert citations[0] == {
        "id": 2,
        "document_id": "doc2",
        "source": "doc2.md",
        "title": "Title 2",
        "section": "Section 2",
        "page": None,
        "snippet": "Fact number 2 about fees and limits.",
        "score": 0.52,
    }
    assert extract_citations("No citations here.", chunks) == []

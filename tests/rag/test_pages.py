"""Answer pages: fixed runs of a document's chunks, rendered the same way on every turn (app/rag/pages.py)."""

from __future__ import annotations

from app.rag.base import Chunk
from app.rag.chain import build_page_messages, cited_numbers, page_instructions, prompt_passages
from app.rag.pages import PageBook, page_prefix, paginate, strip_overlap

SYSTEM = "You are Larkspur Bank's assistant."


def _record(doc: str, n: int, content: str, section: str = "") -> dict[str, object]:
    return {"id": f"{doc}#{n}:x", "document_id": doc, "source": f"{doc}.md", "title": doc.title(),
            "section": section or f"Part {n}", "page": None, "content": content}  # fmt: skip


def _words(n: int, word: str) -> str:
    return " ".join([word] * n)


RECORDS = [
    _record("wires", 0, "Domestic wires cost $25. International wires cost $45."),
    _record("wires", 1, "International wires arrive in 1-5 business days. Domestic ones arrive the same day."),
    _record("savings", 0, "Savings accounts earn 3.1% APY."),
    _record("savings", 1, "More than six withdrawals a month cost $5 each."),
]


def test_a_short_document_is_one_page_with_its_chunks_in_order() -> None:
    book = PageBook(RECORDS, max_tokens=1000)
    assert len(book) == 2
    wires = book.pages[0]
    assert [c.id for c in wires.chunks] == ["wires#0:x", "wires#1:x"]
    assert wires.text.startswith("[1] Wires — Part 0\nDomestic wires cost $25.")
    assert "\n\n[2] Wires — Part 1\nInternational wires arrive" in wires.text
    chunk = Chunk(id="wires#1:x", document_id="wires", source="wires.md", title="Wires", content="", score=0.9)
    assert book.page_of(chunk) is wires
    # The same records give the same pages, byte for byte: the prompt cache is keyed by this text.
    assert PageBook(list(RECORDS), max_tokens=1000).pages[0].key == wires.key


def test_a_long_document_is_cut_between_chunks_within_the_budget() -> None:
    records = [_record("long", n, _words(60, f"w{n}")) for n in range(5)]  # ~80 tokens a chunk
    pages = PageBook(records, max_tokens=200).pages
    assert [len(p.chunks) for p in pages] == [2, 2, 1]
    assert all(p.tokens <= 200 for p in pages)
    assert [p.number for p in pages] == [0, 1, 2]
    # Each page numbers its own chunks from [1].
    assert pages[1].text.startswith("[1] Long — Part 2\n")
    # One chunk over the budget is a page alone, never dropped.
    huge = paginate([Chunk(id="h#0", document_id="h", source="h", title="H", content=_words(400, "x"))], 100)
    assert len(huge) == 1 and len(huge[0].chunks) == 1


def test_the_splitters_overlap_between_neighbour_chunks_is_given_once() -> None:
    previous = "Fees are listed below. Wires cost $25 and arrive the same day."
    assert strip_overlap(previous, "Wires cost $25 and arrive the same day. Checks clear in two days.") == (
        "Checks clear in two days."
    )
    assert strip_overlap(previous, "Nothing shared here at all.") == "Nothing shared here at all."
    assert strip_overlap("ends with a.", "a. short edge") == "a. short edge"  # under 20 characters: chance
    records = [
        _record("d", 0, "First part of the section. The shared sentence is right here.", section="S"),
        _record("d", 1, "The shared sentence is right here. Then what follows.", section="S"),
    ]
    text = PageBook(records, 1000).pages[0].text
    assert text.count("The shared sentence is right here.") == 1 and "[2] D — S\nThen what follows." in text


def test_a_page_prompt_shares_its_head_with_every_question_on_the_page() -> None:
    book = PageBook(RECORDS, max_tokens=1000)
    wires = book.pages[0]
    retrieved = [Chunk(**{**RECORDS[1], "score": 0.8}), Chunk(**{**RECORDS[3], "score": 0.4})]  # type: ignore[arg-type]
    one = build_page_messages("how long do international wires take?", [], wires, retrieved, system_prompt=SYSTEM)
    history = [{"role": "user", "content": "wire fee?"}, {"role": "assistant", "content": "$45 [1]."}]
    other = build_page_messages("and domestic?", history, wires, retrieved[:1], system_prompt=SYSTEM)
    head = page_prefix(page_instructions(SYSTEM), wires)
    assert one.messages[0]["content"] == head == other.messages[0]["content"]
    assert [m["role"] for m in other.messages] == ["system", "user", "assistant", "user"]
    assert [c.id for c in one.sources] == ["wires#0:x", "wires#1:x"]
    assert one.sources[1].score == 0.8  # the retrieved chunk's own scores travel with it
    assert prompt_passages(one.messages[0]["content"], one.sources)[1].startswith("International wires arrive")


def test_passages_of_other_documents_follow_the_page_when_asked_for() -> None:
    wires = PageBook(RECORDS, max_tokens=1000).pages[0]
    retrieved = [Chunk(**RECORDS[0]), Chunk(**RECORDS[3])]  # type: ignore[arg-type]
    prepared = build_page_messages(
        "what does a wire cost and what do extra savings withdrawals cost?", [], wires, retrieved,
        system_prompt=SYSTEM, extra_tokens=80,
    )  # fmt: skip
    system = prepared.messages[0]["content"]
    assert system.startswith(page_prefix(page_instructions(SYSTEM), wires))  # the cached head comes first
    assert "[3] Savings — Part 1\nMore than six withdrawals a month cost $5 each." in system
    assert [c.id for c in prepared.sources] == ["wires#0:x", "wires#1:x", "savings#1:x"]
    assert cited_numbers("Wires cost $45 [1]; withdrawals $5 [3].") == [1, 3]
    none = build_page_messages("q?", [], wires, retrieved, system_prompt=SYSTEM, extra_tokens=0)
    assert len(none.sources) == 2 and "[3]" not in none.messages[0]["content"].split("Sources:")[1]


def test_other_documents_join_the_page_only_when_retrieval_was_a_close_call() -> None:
    wires = PageBook(RECORDS, max_tokens=1000).pages[0]
    question = "what does a wire cost and what do extra savings withdrawals cost?"

    def sources_with(savings_score: float) -> list[str]:
        retrieved = [Chunk(**{**RECORDS[0], "score": 0.60}), Chunk(**{**RECORDS[3], "score": savings_score})]  # type: ignore[arg-type]
        prepared = build_page_messages(
            question, [], wires, retrieved, system_prompt=SYSTEM, extra_tokens=80, extra_margin=0.05
        )
        return [c.id for c in prepared.sources]

    assert sources_with(0.57)[-1] == "savings#1:x"  # within the margin: a close call, its passage follows the page
    assert sources_with(0.50) == ["wires#0:x", "wires#1:x"]  # clearly behind the page's chunk: the page alone

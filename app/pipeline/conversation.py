"""Questions about the conversation itself ("what was my name?", "can you say that more simply?").

The knowledge base cannot answer them: retrieval finds nothing (the turn would say "I don't know") or finds a
chunk the small model then quotes instead. When a question refers to the conversation and there is history, the
answer is generated from the history alone, with an instruction to add no facts of its own (the groundedness and
safety output rails still run on it).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.llm.base import ChatBackend, Completion, GenerationOptions, Usage

# Phrases that point back at the conversation, kept narrow ("what's my name", not "my name"; "that simpler", not
# "simpler"): a match with history skips the sources, so a bank question must not match. Most need a referent
# ("that", "it", "your answer", "you said"): "can I get statements in Spanish" is a bank question, "can you put
# that in Spanish" is not.
_ANSWER = r"(?:answer|reply|response|explanation)"  # what the assistant said, as customers name it
_REFERENT = r"(?:that|it|this|those|your (?:last |previous |earlier |first )?" + _ANSWER + ")"
_PATTERNS = (
    # "whats": customers drop apostrophes. "who am i" alone or "again" ("who am I paying for the overdraft" is not)
    r"what(?:'?s| is| was) my name|(?:remember|know) my name|who am i(?= again\b|\W*$)",
    r"what did (?:you|i) (?:just )?(?:say|said|ask|write|mention|tell(?: you)?)|have i asked",
    r"what (?:was|were) (?:my|the|your) (?:last |previous |first |earlier )?(?:question|message|answer|name)",
    r"you (?:just |already |earlier )?(?:said|told|mentioned|wrote|gave|listed|explained|described|suggested|meant)"
    r"|did you (?:just )?(?:say|mention|tell me|write|give me)",
    # "I asked for $40 and got $20", "i said not me" are bank questions: the customer's own words need more
    r"i (?:just |already )?(?:told you|asked you|mentioned (?:earlier|before))|(?:as|like) i said|"
    r"what i (?:said|asked)",
    r"(?:say|explain|repeat|rephrase|reword|word|simplify|shorten|summari[sz]e|clarify|translate|rewrite|"
    r"go over|expand on|elaborate on|give me|go back to) " + _REFERENT + r"|break (?:that|it|this) down|"
    r"make (?:that|it|this) (?:shorter|simpler|clearer|easier)|(?:the|your) (?:last|previous|earlier) " + _ANSWER + "|"
    # not "where do I put it?", "put it into an index fund"
    r"put (?:that|it|this|your answer) (?:another way|differently|more simply|simply|(?:in|into) (?:other|simple|"
    r"simpler|plain|one|a sentence|bullet|a list|a numbered|a table|spanish|english|french|layman))",
    r"repeat (?:the|that|it|your)|more simply|(?:that|it) simpler|in (?:one|a) sentence",
    r"(?:summari[sz]e|sum up) (?:our|this|the) (?:chat|conversation|discussion)|"
    r"what (?:have we|did we) (?:talk|discuss|cover)|what have we talked",
    r"(?:the )?(?:second|third|first|last) (?:step|point|one)|earlier you|as you said|like you said",
    r"what (?:do|did) you mean|what you (?:meant|said)",
    r"(?:^|\bi |sorry,? )(?:didn'?t|did not|don'?t|do not|couldn'?t) (?:catch|get|understand|follow) "
    r"(?:(?:that|it)(?=\W*$)|you\b|what you|your (?:last |previous )?(?:" + _ANSWER + "|point))|"
    r"\bi (?:didn'?t|don'?t|do not|did not) (?:follow|understand)(?=\W*$)",  # not "they didn't get it"
    r"you lost me|missed (?:that|what you)|come again|tl;? ?dr|dumb (?:it|that) down|in a nutshell|the gist|"
    r"(?:the )?(?:short|shorter|quick|simple|simpler) version|that was confusing",
    r"what (?:was|were) (?:that|those) (?:\w+ )?(?:number|fee|amount|rate|address|date|deadline|limit|link|"
    r"website|code|steps?)|what (?:was|were) step \w+|recap",  # not "what is that fee?" (on my statement)
    # ending on "again": it was said before ("what were the steps again", "list those steps again")
    r"(?:what (?:was|were|is|are|'s) (?:the|that|those|your)|list|say|tell me|give me|show me|explain|go over|"
    r"walk me through) (?:\S+ ){0,3}?again(?=\W*$)",
)
_ABOUT_CONVERSATION = re.compile(r"\b(?:" + "|".join(_PATTERNS) + r")\b", re.IGNORECASE)
# A whole message that only asks for the last answer again, or for it told differently ("huh?", "one more time
# please", "explain like I'm five", "what does that mean?"): with words of its own around it, "that" is in the
# message ("I got a letter saying my account is garnished, what does that mean?").
_BARE_REQUEST = re.compile(
    r"\W*(?:(?:ok|okay|sorry|wait|hm+|um+|so)\W+)?(?:huh|what|wut|pardon|sorry|again|say again|once more|"
    r"one more time|in (?:plain|simple) (?:english|words|terms)|what does (?:that|this|it) mean|"
    r"what(?:'?s| is) that mean|(?:(?:can you |could you |pls |please )?(?:explain|say|put) (?:it |that |this )?)?"
    r"(?:to me )?like i'?m (?:five|5|a (?:kid|child)|a five year old)|eli5)(?:\W+(?:please|pls|again))?\W*",
    re.IGNORECASE,
)

INSTRUCTION = (
    "The customer's last message is about this conversation itself. Answer it from the conversation above only: "
    "repeat, rephrase or summarise what was said, and state no facts that the conversation does not contain."
)


# A message that is only a greeting, thanks or goodbye (with an optional "my name is Ada"): no knowledge-base
# question, so finding no source must not make it an "I don't know".
_SMALL_TALK_WORDS = (
    r"hi|hello|hey|hiya|howdy|yo|greetings|good (?:morning|afternoon|evening|day)|thanks?(?: you)?(?: so much| a lot)?|"
    r"thank you(?: very much)?|thx|ty|cheers|bye|goodbye|see you|ok(?:ay)?|cool|great|perfect|awesome|nice|got it|"
    r"sounds good|you(?:'re| are) (?:great|helpful|the best)|that(?:'s| is) (?:all|it|great|helpful)|"
    r"how are you(?: doing)?(?: today)?|there|again|all|everyone|team|larkspur|bot|assistant"
)
_SMALL_TALK = re.compile(
    r"^(?:\W*(?:" + _SMALL_TALK_WORDS + r"|my name is \w+|i(?:'m| am) \w+)\b)+\W*$", re.IGNORECASE
)
SMALL_TALK_INSTRUCTION = (
    "The customer's last message is a greeting, thanks or goodbye. Reply in one or two friendly sentences and "
    "offer help with their banking questions. State no facts about accounts, fees or policies."
)


def is_small_talk(message: str) -> bool:
    return bool(_SMALL_TALK.match(message.strip()))


def small_talk_messages(system_prompt: str, history: list[dict[str, str]], message: str) -> list[dict[str, str]]:
    """The prompt for a greeting: instructions and the earlier turns, no sources (nothing to look up)."""
    from app.rag.chain import dialogue_turns

    return [{"role": "system", "content": f"{system_prompt.strip()}\n\n{SMALL_TALK_INSTRUCTION}"},
            *dialogue_turns(history), {"role": "user", "content": message}]


def about_conversation(question: str) -> bool:
    return bool(_ABOUT_CONVERSATION.search(question) or _BARE_REQUEST.fullmatch(question.strip()))


TRANSCRIPT_TURNS = 8  # the last messages a transcript shows (each side's), enough for "what was my first question?"
TRANSCRIPT_CHARS = 600  # of each earlier answer: its start says what it was about


def transcript(history: list[dict[str, str]]) -> str:
    """The earlier turns as a numbered transcript, the customer's messages in full."""
    from app.rag.chain import dialogue_turns  # the RAG prompt's own turn filter (imported where RAG is used)

    lines, asked = [], 0
    for turn in dialogue_turns(history)[-TRANSCRIPT_TURNS:]:
        if turn["role"] == "user":
            asked += 1
            lines.append(f"Customer (message {asked}): {turn['content'].strip()}")
        else:
            said = " ".join(turn["content"].split())
            lines.append(f"Assistant: {said[:TRANSCRIPT_CHARS]}{'…' if len(said) > TRANSCRIPT_CHARS else ''}")
    return "\n".join(lines)


def conversation_messages(system_prompt: str, history: list[dict[str, str]], question: str) -> list[dict[str, str]]:
    """The prompt for a question about the conversation: instructions, then one user message that shows the earlier
    turns as a transcript and asks the question. Measured on the dev conversations: given the turns as chat messages,
    the 1.5B model answered "what was my last question?" with "I don't have any information about your last
    question"; a transcript it can read from gets it right."""
    shown = transcript(history) or "(nothing yet)"
    ask = f"Our conversation so far:\n\n{shown}\n\nMy new message, about this conversation: {question.strip()}"
    instruction = f"{INSTRUCTION} {NAME_INSTRUCTION}" if asks_name(question) else INSTRUCTION
    return [{"role": "system", "content": f"{system_prompt.strip()}\n\n{instruction}"},
            {"role": "user", "content": ask}]


# Asked for their name, the 1.5B model answered "Yes, I remember your name." or, never told one, "Your name is
# Larkspur Bank." (dialogues of our own, session 15): the instruction asks for the name itself, and an answer that
# names the customer with no word of their own messages is replaced by NO_NAME (NameCheckedLLM).
_ASKS_NAME = re.compile(
    r"\b(?:what(?:'?s| is| was) my name|(?:remember|know|recall|forget|forgot) my name|who am i(?= again\b|\W*$)|"
    r"what did i say my name|what name did i)",
    re.IGNORECASE,
)
NAME_INSTRUCTION = (
    'Asked about their name, say the name the customer gave in their own messages ("Your name is ..."); if they '
    "never gave one, say that they have not told you their name."
)
NO_NAME = "You haven't told me your name in this conversation."
_NAMED_AS = re.compile(
    r"\b(?:your name (?:is|was)|you are|you're|you said (?:you were|it was|it's))\s+[\"'\u201c\[<(]?"
    r"([^\W\d_][\w'-]*)",
    re.IGNORECASE,
)


def asks_name(question: str) -> bool:
    return bool(_ASKS_NAME.search(question))


def names_someone_else(answer: str, history: list[dict[str, str]]) -> bool:
    """The answer calls the customer by a name (or "you are ...") none of their messages holds."""
    named = [m.group(1).lower() for m in _NAMED_AS.finditer(answer)]
    said = " ".join(m["content"] for m in history if m.get("role") == "user").lower()
    words = set(re.findall(r"[^\W\d_][\w'-]*", said))
    return bool(named) and not any(name in words for name in named)


class NameCheckedLLM:
    """The chat backend for a question about the customer's name: the answer (a few words) is read whole, and one
    that names the customer with a word none of their messages holds becomes NO_NAME. Everything else is `llm`'s."""

    def __init__(self, llm: ChatBackend, history: list[dict[str, str]]) -> None:
        self._llm, self._history = llm, history
        self.model_name = llm.model_name
        self.continues_assistant = llm.continues_assistant

    def stream(
        self,
        messages: list[dict[str, str]],
        options: GenerationOptions | None = None,
        *,
        on_usage: Callable[[Usage], None] | None = None,
    ) -> AsyncIterator[str]:
        return self._checked(messages, options, on_usage)

    async def _checked(
        self,
        messages: list[dict[str, str]],
        options: GenerationOptions | None,
        on_usage: Callable[[Usage], None] | None,
    ) -> AsyncIterator[str]:
        answer = "".join([delta async for delta in self._llm.stream(messages, options, on_usage=on_usage)])
        yield NO_NAME if names_someone_else(answer, self._history) else answer

    async def complete(self, messages: list[dict[str, str]], options: GenerationOptions | None = None) -> Completion:
        return await self._llm.complete(messages, options)

    async def complete_prompt(self, prompt: str, options: GenerationOptions | None = None) -> Completion:
        return await self._llm.complete_prompt(prompt, options)

    async def health(self) -> None:
        await self._llm.health()

    async def aclose(self) -> None:  # the state's backend is closed by its owner
        return None

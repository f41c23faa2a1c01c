"""Llama Guard prompts, built at token level (reference §1 and §1.11).

A prompt is a list of pieces: special tokens (by name) and text spans. Text is encoded with
special-token parsing disabled, so a user who types `<|eot_id|>` cannot close the turn or forge a
verdict. `render()` joins the pieces into the exact string the model was trained on; golden tests
pin it byte for byte. Every prompt ends with the family's blank-line token so the next token is
the verdict itself (its probability is the score).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from proxy.guards.categories import LG1_CATEGORIES, LG2_CATEGORIES, LG3_CATEGORIES
from proxy.guards.guard import Category, GuardError, Image, Taxonomy, Turn


@dataclass(frozen=True)
class Special:
    token: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ImageSlot:
    """Where an image goes (LG4): `<|image|>` in the rendered text, its tiles' tokens in the ids."""

    image: Image


Piece = Special | Text | ImageSlot

INSTRUCTION_LAST = (
    "Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
)
INSTRUCTION_LG1 = (
    "Provide your safety assessment for {role} in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
)


@dataclass(frozen=True)
class Family:
    name: str
    bos: str
    inst: bool  # Llama 2 [INST] wrapping (LG1/LG2) instead of chat headers
    header_start: str = ""
    header_end: str = ""
    eot: str = ""
    according: str = "according"
    space_before_eot: bool = False
    conversation_open: str = "\n\n"
    turn_end: str = "\n\n"
    conversation_close: str = ""
    tail: str = "\n\n"
    name_suffix: str = ""  # LG1/LG2 category lines end with ". " (a space after the name)
    instruction: str = INSTRUCTION_LAST
    defaults: tuple[Category, ...] = LG3_CATEGORIES
    image_defaults_drop: tuple[str, ...] = ()
    verdict_spellings: tuple[str, ...] = ("{w}",)  # vocabulary pieces of the first answer token
    stop_tokens: tuple[str, ...] = ()
    multimodal: bool = False

    def verdict_texts(self, word: str) -> tuple[str, ...]:
        """The surface text of each counted spelling of `word` ("safe", and " safe" for LG1/LG2)."""
        return tuple(s.format(w=word).replace("▁", " ").replace("Ġ", " ") for s in self.verdict_spellings)


FAMILIES: dict[str, Family] = {
    "llama-guard-1": Family(
        "llama-guard-1",
        bos="<s>",
        inst=True,
        tail="",
        name_suffix=" ",
        instruction=INSTRUCTION_LG1,
        defaults=LG1_CATEGORIES,
        verdict_spellings=("{w}", "▁{w}"),
        stop_tokens=("</s>",),
    ),
    "llama-guard-2": Family(
        "llama-guard-2",
        bos="<|begin_of_text|>",
        inst=True,
        tail="",
        name_suffix=" ",
        defaults=LG2_CATEGORIES,
        verdict_spellings=("{w}", "Ġ{w}"),
        stop_tokens=("<|eot_id|>", "<|end_of_text|>"),
    ),
    "llama-guard-3-8b": Family(
        "llama-guard-3-8b",
        bos="<|begin_of_text|>",
        inst=False,
        header_start="<|start_header_id|>",
        header_end="<|end_header_id|>",
        eot="<|eot_id|>",
        stop_tokens=("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"),
    ),
    "llama-guard-3-1b": Family(
        "llama-guard-3-1b",
        bos="<|begin_of_text|>",
        inst=False,
        header_start="<|start_header_id|>",
        header_end="<|end_header_id|>",
        eot="<|eot_id|>",
        space_before_eot=True,
        defaults=LG3_CATEGORIES[:13],
        stop_tokens=("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"),
    ),
    "llama-guard-4": Family(
        "llama-guard-4",
        bos="<|begin_of_text|>",
        inst=False,
        header_start="<|header_start|>",
        header_end="<|header_end|>",
        eot="<|eot|>",
        according="according to",
        space_before_eot=True,
        conversation_open="\n",
        turn_end="\\n\\n",
        conversation_close="\n\n",
        image_defaults_drop=("S14",),
        stop_tokens=("<|eot|>", "<|end_of_text|>", "<|eom|>"),
        multimodal=True,
    ),
}

IMAGE_TOKEN = "<|image|>"


def categories_for(family: Family, taxonomy: Taxonomy, has_images: bool = False) -> list[Category]:
    """The category lines the prompt lists: defaults (or the custom list that replaces them), custom
    additions, minus excluded codes. Codes keep their numbers."""
    if taxonomy.replace:
        base = list(taxonomy.custom)
    else:
        base = [c for c in family.defaults if not (has_images and c.code in family.image_defaults_drop)]
        known = {c.code for c in base}
        base += [c for c in taxonomy.custom if c.code not in known]
        overrides = {c.code: c for c in taxonomy.custom}
        base = [overrides.get(c.code, c) for c in base]
    return [c for c in base if c.code not in taxonomy.excluded]


def category_block(family: Family, categories: list[Category]) -> str:
    lines = []
    for cat in categories:
        line = f"{cat.code}: {cat.name}{family.name_suffix}"
        if cat.description:
            line += f"\n{cat.description}"
        lines.append(line + "\n")
    return "".join(lines)


def assessed_role(turns: list[Turn]) -> str:
    return "Agent" if turns and turns[-1].speaker == "Agent" else "User"


def neutralise(family: Family, text: str) -> str:
    """[INST] markers are plain text to LG1/LG2 and cannot be disabled as special tokens: drop them."""
    text = text.strip()
    if family.inst:
        text = text.replace("[/INST]", "").replace("[INST]", "")
    return text


def conversation_pieces(family: Family, turns: list[Turn]) -> list[Piece]:
    pieces: list[Piece] = []
    for turn in turns:
        pieces.append(Text(f"{turn.speaker}: "))
        if family.multimodal:
            pieces.extend(ImageSlot(image) for image in turn.images)
        pieces.append(Text(neutralise(family, turn.text) + family.turn_end))
    return pieces


def build(family: Family, turns: list[Turn], taxonomy: Taxonomy) -> list[Piece]:
    """The whole prompt for `turns` (alternating, starting with User); the last turn is assessed."""
    has_images = any(t.images for t in turns)
    role = assessed_role(turns)
    cats = category_block(family, categories_for(family, taxonomy, has_images))
    task = (
        f"Task: Check if there is unsafe content in '{role}' messages in conversations {family.according} "
        "our safety policy with the below categories.\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{cats}<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>{family.conversation_open}"
    )
    closing = f"{family.conversation_close}<END CONVERSATION>\n\n" + family.instruction.format(role=role)
    body: list[Piece] = [Text(task), *conversation_pieces(family, turns), Text(closing)]
    if family.inst:
        return [Special(family.bos), Text("[INST] "), *body, Text(" [/INST]")]
    return [
        Special(family.bos),
        Special(family.header_start),
        Text("user"),
        Special(family.header_end),
        Text("\n\n"),
        *body,
        Text(" " if family.space_before_eot else ""),
        Special(family.eot),
        Special(family.header_start),
        Text("assistant"),
        Special(family.header_end),
        Text(family.tail),
    ]


def render(pieces: list[Piece]) -> str:
    return "".join(
        p.token if isinstance(p, Special) else IMAGE_TOKEN if isinstance(p, ImageSlot) else p.text for p in pieces
    )


def merge_text(pieces: list[Piece]) -> list[Piece]:
    """Adjacent text spans joined, so each span is encoded in one call (as the model saw it)."""
    out: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, Text) and out and isinstance(out[-1], Text):
            out[-1] = Text(out[-1].text + piece.text)
        elif not (isinstance(piece, Text) and not piece.text):
            out.append(piece)
    return out


def encode_hf(pieces: list[Piece], tokenizer: Any, pixels: list[Any] | None = None) -> list[int]:
    """Token ids with a Hugging Face tokenizer: special tokens by name, text with special-token
    parsing off, so a user who types `<|eot_id|>` cannot close the turn or forge a verdict. Images
    become their tiles' tokens, and their pixels are appended to `pixels` in prompt order."""
    ids: list[int] = []
    for piece in merge_text(pieces):
        if isinstance(piece, Special):
            ids.append(_special_id(tokenizer, piece.token))
        elif isinstance(piece, ImageSlot):
            if pixels is None:
                raise GuardError("this guard backend cannot screen images (use the transformers backend)")
            from proxy.guards.llama4_images import prepare

            prepared = prepare(piece.image)
            pixels.append(prepared.pixels)
            ids.extend(_special_id(tokenizer, token) for token in prepared.tokens())
        else:
            ids.extend(
                tokenizer(piece.text, add_special_tokens=False, split_special_tokens=True, verbose=False).input_ids
            )
    return ids


def _special_id(tokenizer: Any, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or found == tokenizer.unk_token_id:
        raise GuardError(f"the tokenizer has no {token} token: is the guard's family right?")
    return int(found)


CODE = re.compile(r"\b([A-Z]\d{1,3})\b")


def read_verdict(family: Family, p_safe: float, p_unsafe: float, min_mass: float) -> tuple[float, float, float]:
    """(score, binary score, mass) from the first-token probabilities; a mass under `min_mass`
    means the prompt is not in the family's format: an error, never a verdict."""
    mass = p_safe + p_unsafe
    if not mass >= min_mass:  # NaN included: never a verdict
        raise GuardError(
            f"P(safe)+P(unsafe) is {mass:.3f} < {min_mass}: the prompt does not match the {family.name} format"
        )
    return p_unsafe, p_unsafe / mass, mass


def read_categories(continuation: str, taxonomy: Taxonomy) -> tuple[tuple[str, ...], bool]:
    """(codes named after `unsafe`, excluded ones removed; True if every named code is excluded)."""
    codes = tuple(dict.fromkeys(CODE.findall(continuation.strip().split("\n\n")[0])))
    kept = tuple(c for c in codes if c not in taxonomy.excluded)
    return kept, bool(codes) and not kept

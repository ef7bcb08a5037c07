"""Judge prompts as editable templates: the defaults, their placeholders, reading and writing them as YAML.

A template is a system message and a user message with ``{placeholders}`` (Python's ``str.format`` syntax;
a literal brace is doubled), optionally preceded by worked examples (``shots``: user and assistant turns sent as
they are, for judges too small to follow an instruction alone). Five kinds, each with the placeholders it must
use and may not exceed:

- ``pairwise``: ``{question}``, ``{answer_a}``, ``{answer_b}``; the judge ends with ``[[A]]``, ``[[B]]`` or
  ``[[C]]`` (a tie), MT-Bench's pairwise verdict format.
- ``single``: ``{question}``, ``{answer}``; the judge ends with ``Rating: [[N]]``, N from 1 to 10 (MT-Bench's
  single-answer grading format).
- ``single_reference``: ``single`` plus ``{reference}``, a reference answer (MT-Bench's math, reasoning and
  coding questions).
- ``single_multi``: a two-turn conversation, ``{question_1}``, ``{answer_1}``, ``{question_2}``,
  ``{answer_2}``; the second answer is graded.
- ``single_multi_reference``: ``single_multi`` plus ``{reference_1}``, ``{reference_2}``.

``jaxalign eval --write-judge-templates DIR`` writes the defaults as ``DIR/<kind>.yaml`` to edit;
``--judge-templates DIR`` reads every ``<kind>.yaml`` found there (the rest stay the defaults).
"""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path

import yaml

__all__ = ["DEFAULT_TEMPLATES", "KINDS", "Template", "load_templates", "write_templates"]

KINDS: dict[str, frozenset[str]] = {
    "pairwise": frozenset({"question", "answer_a", "answer_b"}),
    "single": frozenset({"question", "answer"}),
    "single_reference": frozenset({"question", "answer", "reference"}),
    "single_multi": frozenset({"question_1", "answer_1", "question_2", "answer_2"}),
    "single_multi_reference": frozenset({"question_1", "answer_1", "question_2", "answer_2", "reference_1",
                                         "reference_2"}),
}


def _fields(text: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as error:
        raise ValueError(f"{where}: {error} (a literal brace is written twice: {{{{ or }}}})") from None


@dataclasses.dataclass(frozen=True)
class Template:
    """One judge prompt.

    Attributes:
        kind: one of :data:`KINDS`.
        prompt: the user message, with the kind's placeholders.
        system: the system message (placeholders are not filled in there).
        source: where it came from (a file, or ``"default"``), named in errors.
        shots: ``((user, assistant), ...)`` worked examples sent before the prompt, as they are.
    """

    kind: str
    prompt: str
    system: str = ""
    source: str = "default"
    shots: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.source}: unknown template kind {self.kind!r} (one of {', '.join(KINDS)})")
        found = _fields(self.prompt, f"{self.source}: field 'prompt'")
        needed = KINDS[self.kind]
        if missing := sorted(needed - found):
            raise ValueError(f"{self.source}: the {self.kind} template's 'prompt' lacks the placeholder(s) "
                             + ", ".join("{" + m + "}" for m in missing))
        if unknown := sorted(found - needed):
            raise ValueError(f"{self.source}: the {self.kind} template's 'prompt' has unknown placeholder(s) "
                             + ", ".join("{" + u + "}" for u in unknown)
                             + f" (it may use {', '.join('{' + n + '}' for n in sorted(needed))})")
        if "" in found or any(name.isdigit() for name in found):
            raise ValueError(f"{self.source}: the {self.kind} template's 'prompt' has a positional placeholder {{}}")
        for number, shot in enumerate(self.shots, start=1):
            if not (isinstance(shot, tuple) and len(shot) == 2 and all(isinstance(t, str) and t for t in shot)):
                raise ValueError(f"{self.source}: shot {number} must be a (user, assistant) pair of non-empty texts")

    def messages(self, **fields: str) -> list[dict[str, str]]:
        """The chat messages for one judgment."""
        content = self.prompt.format(**fields)
        shots = [{"role": role, "content": text} for shot in self.shots
                 for role, text in zip(("user", "assistant"), shot)]
        return ([{"role": "system", "content": self.system}] if self.system else []) + shots + [
            {"role": "user", "content": content}]


_PAIRWISE_SYSTEM = (
    "You are an impartial evaluator comparing two AI assistants' answers to the same user question. Decide "
    "which answer serves the user better: consider whether it is correct, helpful, relevant, as detailed as the "
    "question calls for, and harmless. Judge the content, not the length: a longer answer is not better for being "
    "longer. Ignore the order in which the answers appear and the assistants' names. Explain your comparison "
    "briefly, then give your verdict on the last line, exactly in this format: \"[[A]]\" if assistant A's answer "
    "is better, \"[[B]]\" if assistant B's answer is better, \"[[C]]\" for a tie.")
_PAIRWISE = (
    "[User question]\n{question}\n\n"
    "[Assistant A's answer]\n{answer_a}\n[End of assistant A's answer]\n\n"
    "[Assistant B's answer]\n{answer_b}\n[End of assistant B's answer]")
_SINGLE_SYSTEM = (
    "You are an impartial evaluator grading one AI assistant's answer to a user question. Consider whether the "
    "answer is correct, helpful, relevant, as detailed as the question calls for, and harmless. Explain your "
    "assessment briefly, then give a grade from 1 (useless or harmful) to 10 (excellent) on the last line, "
    "exactly in this format: \"Rating: [[5]]\".")
_SINGLE = "[User question]\n{question}\n\n[Assistant's answer]\n{answer}\n[End of assistant's answer]"
_SINGLE_REFERENCE_SYSTEM = _SINGLE_SYSTEM.replace(
    "Consider whether", "A reference answer is given: check the assistant's answer against it, and weigh "
    "correctness most. Also consider whether")
_SINGLE_REFERENCE = ("[User question]\n{question}\n\n[Reference answer]\n{reference}\n[End of reference answer]\n\n"
                     "[Assistant's answer]\n{answer}\n[End of assistant's answer]")
_MULTI_SYSTEM = _SINGLE_SYSTEM.replace(
    "grading one AI assistant's answer to a user question.",
    "grading an AI assistant in a two-turn conversation. Grade only the assistant's second answer, in the "
    "context of the whole conversation.")
_MULTI = ("[User, turn 1]\n{question_1}\n\n[Assistant, turn 1]\n{answer_1}\n\n"
          "[User, turn 2]\n{question_2}\n\n[Assistant, turn 2 (grade this answer)]\n{answer_2}\n[End of conversation]")
_MULTI_REFERENCE_SYSTEM = _MULTI_SYSTEM.replace(
    "Consider whether", "Reference answers for both turns are given: check the second answer against the second "
    "reference, and weigh correctness most. Also consider whether")
_MULTI_REFERENCE = ("[Reference answer, turn 1]\n{reference_1}\n\n[Reference answer, turn 2]\n{reference_2}\n\n"
                    + _MULTI)

DEFAULT_TEMPLATES: dict[str, Template] = {
    "pairwise": Template("pairwise", _PAIRWISE, _PAIRWISE_SYSTEM),
    "single": Template("single", _SINGLE, _SINGLE_SYSTEM),
    "single_reference": Template("single_reference", _SINGLE_REFERENCE, _SINGLE_REFERENCE_SYSTEM),
    "single_multi": Template("single_multi", _MULTI, _MULTI_SYSTEM),
    "single_multi_reference": Template("single_multi_reference", _MULTI_REFERENCE, _MULTI_REFERENCE_SYSTEM),
}


def read_template(path: Path, kind: str) -> Template:
    """A template from a YAML file with ``prompt`` (required) and ``system`` (optional) strings, and optional
    ``shots``: a list of ``{user, assistant}`` mappings."""
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a mapping with 'prompt' and optionally 'system'")
    if unknown := sorted(set(content) - {"prompt", "system", "shots"}):
        raise ValueError(f"{path}: unknown field(s) {', '.join(map(repr, unknown))} (a template has 'prompt', "
                         "'system' and 'shots')")
    for field in ("prompt", "system"):
        if field in content and not isinstance(content[field], str):
            raise ValueError(f"{path}: field {field!r} must be a string")
    if not content.get("prompt"):
        raise ValueError(f"{path}: field 'prompt' is missing or empty")
    shots = content.get("shots") or []
    if not isinstance(shots, list) or not all(isinstance(shot, dict) and set(shot) == {"user", "assistant"}
                                              for shot in shots):
        raise ValueError(f"{path}: field 'shots' must be a list of {{user, assistant}} mappings")
    return Template(kind, content["prompt"], content.get("system") or "", source=str(path),
                    shots=tuple((shot["user"], shot["assistant"]) for shot in shots))


def load_templates(directory: str | Path | None) -> dict[str, Template]:
    """The defaults, with each ``<kind>.yaml`` found in ``directory`` instead; other ``.yaml`` files there are
    an error (a misspelt kind would otherwise be ignored)."""
    templates = dict(DEFAULT_TEMPLATES)
    if directory is None:
        return templates
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--judge-templates {directory}: no such directory")
    for path in sorted(directory.glob("*.yaml")):
        if path.stem not in KINDS:
            raise ValueError(f"{path}: not a template kind (the files are {', '.join(k + '.yaml' for k in KINDS)})")
        templates[path.stem] = read_template(path, path.stem)
    return templates


def write_templates(directory: str | Path) -> list[Path]:
    """Write the default templates as ``directory/<kind>.yaml``; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, template in DEFAULT_TEMPLATES.items():
        path = directory / f"{kind}.yaml"
        text = yaml.safe_dump({"system": template.system, "prompt": template.prompt}, sort_keys=False,
                              allow_unicode=True, width=100, default_style="|")
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths

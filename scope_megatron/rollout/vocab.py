"""The teacher must read the student's token ids as the same tokens.

Teacher scoring sends the student's token ids to the teacher (``input_ids``) and reads back
log-probs per id, so the two tokenizers must map every token of the student's vocabulary to the
same id. Padded embedding sizes may differ (e.g. 151,936 rows for the 1.5B and 152,064 for the
7B models of one Qwen2.5 tokenizer): only the tokenizers are compared, over the student's whole
``get_vocab()`` (regular, added and special tokens).

The teacher's tokenizer comes from ``teacher.tokenizer``, else ``teacher.model`` (an HF
directory), else the ``tokenizer_path`` / ``model_path`` the teacher server reports in
``/model_info`` when that is a readable local directory. When none is available the check is
skipped with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError

logger = logging.getLogger(__name__)

# files one of which an HF tokenizer directory holds
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class VocabularyMismatch(ConfigError):
    """The teacher's tokenizer maps some of the student's tokens to other ids (or does not load)."""

    def __init__(self, message: str, field_name: str = "teacher.model"):
        super().__init__(field_name, message)


@dataclass
class Mismatch:
    """One student token the teacher reads differently (``teacher_id`` None: the teacher lacks it)."""

    token: str
    student_id: int
    teacher_id: int | None


def vocabulary_mismatches(student_vocab: dict[str, int], teacher_vocab: dict[str, int]) -> list[Mismatch]:
    """Every token of ``student_vocab`` (token -> id) whose id differs in ``teacher_vocab``, by student id.

    Tokens only the teacher has are not mismatches: the student never sends them.
    """
    out = [Mismatch(token, sid, teacher_vocab.get(token)) for token, sid in student_vocab.items()
           if teacher_vocab.get(token) != sid]
    out.sort(key=lambda m: m.student_id)
    return out


def check_vocabularies(student_tokenizer: Any, teacher_tokenizer: Any, *, student_name: str, teacher_name: str,
                       examples: int = 5, field_name: str = "teacher.model") -> None:
    """Raise :class:`VocabularyMismatch` unless the teacher maps every student token to the student's id.

    The message names both models, counts the mismatches and shows up to ``examples`` of them
    as (token, student id, teacher id).
    """
    student_vocab = student_tokenizer.get_vocab()  # includes added and special tokens
    mismatches = vocabulary_mismatches(student_vocab, teacher_tokenizer.get_vocab())
    if not mismatches:
        logger.info("teacher vocabulary check: %s maps all %d tokens of %s to the same ids", teacher_name,
                    len(student_vocab), student_name)
        return
    shown = ", ".join(f"({m.token!r}, student {m.student_id}, teacher "
                      f"{'missing' if m.teacher_id is None else m.teacher_id})" for m in mismatches[:examples])
    raise VocabularyMismatch(
        f"the teacher {teacher_name} does not share the student's vocabulary ({student_name}): "
        f"{len(mismatches)} of the student's {len(student_vocab)} tokens have another id in the teacher's "
        f"tokenizer or are missing, e.g. {shown}. Teacher scores of the student's token ids would be scores of "
        f"other tokens; use a teacher with the student's tokenizer", field_name)


def _tokenizer_dir(path: str | None) -> Path | None:
    """``path`` when it is a local directory with tokenizer files, else None."""
    if not path:
        return None
    p = Path(path)
    try:
        if p.is_dir() and any((p / name).is_file() for name in TOKENIZER_FILES):
            return p
    except OSError:  # unreadable
        return None
    return None


def load_tokenizer(path: str | Path) -> Any:
    """An HF tokenizer from a local directory (never the hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def check_teacher_vocabulary(student_tokenizer: Any, *, student_name: str, tokenizer_dir: str | None,
                             model_dir: str | None, model_info: Callable[[], dict[str, Any] | None] | None = None,
                             teacher_url: str | None = None, field_prefix: str = "teacher") -> str:
    """Find the teacher's tokenizer and run :func:`check_vocabularies`; return what was checked.

    ``tokenizer_dir`` (``teacher.tokenizer``) must load when set. Otherwise ``model_dir``
    (``teacher.model``) is used when it holds a tokenizer, else ``model_info()`` (the teacher
    server's ``/model_info``) is asked for ``tokenizer_path`` / ``model_path``; a path this
    machine cannot read is skipped. Returns ``"checked <dir>"`` or ``"skipped: <why>"``
    (skipping also logs a warning). ``field_prefix``: the config section of this teacher
    (``teacher``, or ``teacher.others.NAME``), which the errors name.
    """
    if tokenizer_dir:
        try:
            teacher = load_tokenizer(tokenizer_dir)
        except Exception as exc:
            raise VocabularyMismatch(f"{tokenizer_dir!r} cannot be loaded as an HF tokenizer: "
                                     f"{type(exc).__name__}: {exc}", f"{field_prefix}.tokenizer") from exc
        check_vocabularies(student_tokenizer, teacher, student_name=student_name, teacher_name=tokenizer_dir,
                           field_name=f"{field_prefix}.tokenizer")
        return f"checked {tokenizer_dir}"
    candidates: list[str] = []
    if model_dir:
        candidates.append(model_dir)
    if model_info is not None and _tokenizer_dir(model_dir) is None:
        info = model_info() or {}
        for key in ("tokenizer_path", "model_path"):
            value = info.get(key)
            if isinstance(value, str) and value and value not in candidates:
                candidates.append(value)
    for candidate in candidates:
        directory = _tokenizer_dir(candidate)
        if directory is None:
            continue
        try:
            teacher = load_tokenizer(directory)
        except Exception as exc:  # a directory we can see but not load: say so, try the next
            logger.warning("teacher vocabulary check: %s does not load as a tokenizer (%s: %s)", directory,
                           type(exc).__name__, exc)
            continue
        name = candidate if teacher_url is None else f"{candidate} (served at {teacher_url})"
        check_vocabularies(student_tokenizer, teacher, student_name=student_name, teacher_name=name,
                           field_name=f"{field_prefix}.model")
        return f"checked {directory}"
    where = ", ".join(repr(c) for c in candidates) or f"no {field_prefix}.model and no path from /model_info"
    why = (f"no readable teacher tokenizer ({where}); set {field_prefix}.tokenizer to a local copy of the teacher's "
           f"tokenizer to check that it shares the student's vocabulary")
    logger.warning("teacher vocabulary check skipped: %s", why)
    return f"skipped: {why}"

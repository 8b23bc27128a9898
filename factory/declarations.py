"""What an alloy declares about its source, checked against the checkpoint.

Two stage types declare facts rather than do work: `source-config` (the
context length, input modalities and tokenizer the recipe expects) and
`modality` (the encoder tower a recipe relies on). A declaration the
checkpoint contradicts would otherwise surface hours later, as a model that
cannot read its images or a context it never had, so `factory plan` and the
intake gate run these checks on the source's config.json before a part is
queued, and the stations run them again on the real files at run time.

The functions are pure: typed stages, a parsed config.json and the adapters
`Family` in, a list of `DeclarationProblem` out (empty: consistent). Nothing
here reads files or imports torch, so the daemon can call it.

What "has a tower" means here: the family spec lists the towers its
checkpoints carry (`Family.towers`, each with the sub-config that configures
it); for a family whose spec lists none, the config's own sub-configs say
(`vision_config`, `audio_config`, also nested one level, as Qwen2.5-Omni's
`thinker_config` nests them).

Why a modality stage never grafts an encoder: fitting a new encoder
(`encoderModel` other than the model's own tower) means training a projector
on image-text pairs and changing the embedding the decoder reads; nothing on
this line does that, and pretending to would ship a model that cannot see.
So a `modality` stage names a tower the source already has; the station then
checks and records that tower, and every later weight-writing stage proves
it unchanged (`stations.towers`). A modality the source has no tower for is
refused here, with that reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from adapters.schema import Family
from factory.alloy import ContextExtendStage, ModalityStage, SourceConfigStage, Stage

TEXT = "text"
# inputModalities spelling -> the tower that reads it. Images and video go
# through the same vision tower in every family the adapters know.
INPUT_MODALITIES: dict[str, str] = {"text": TEXT, "vision": "vision", "image": "vision", "video": "vision",
                                    "audio": "audio"}
# config.json sub-config key -> the modality of the tower it configures.
TOWER_CONFIG_KEYS: dict[str, str] = {"vision_config": "vision", "audio_config": "audio"}
# Config keys holding a special token id a tower's inputs are marked with
# (image_token_id, vision_start_token_id, audio_token_index, ...); the first
# word names the modality the token belongs to.
_TOKEN_ID_KEY = re.compile(r"^(image|video|vision|audio)_(?:\w+_)?token_(?:id|index)$")
_TOKEN_MODALITY = {"image": "vision", "video": "vision", "vision": "vision", "audio": "audio"}


@dataclass(frozen=True)
class DeclarationProblem:
    """One declaration the checkpoint contradicts: where the alloy says it,
    what it says, why that is wrong for this source, and what to do."""

    json_path: str
    value: object
    problem: str
    fix: str


@dataclass(frozen=True)
class TokenId:
    """A modality's special token id as config.json states it."""

    key: str  # dotted path inside config.json, e.g. "thinker_config.image_token_index"
    word: str  # what the key says the token marks: image, video, vision or audio
    modality: str  # the tower it belongs to: "vision" or "audio"
    token_id: object  # as written; checked, not trusted


# ── what the checkpoint has ─────────────────────────────────────────────────


def _sub_configs(config: dict[str, Any], depth: int = 2) -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted path, dict) for the config and its nested *_config dicts."""
    yield "", config
    if depth == 0:
        return
    for key, value in config.items():
        if key.endswith("_config") and isinstance(value, dict):
            for path, sub in _sub_configs(value, depth - 1):
                yield f"{key}.{path}" if path else key, sub


def tower_modalities(config: dict[str, Any], family: Family | None) -> set[str]:
    """Input modalities (besides text) the checkpoint has a tower for: the
    family's towers whose sub-config this config has (a tower with no
    sub-config named is taken on the family's word), else the config's own
    vision_config / audio_config."""
    if family is not None and family.towers:
        return {t.modality for t in family.towers
                if t.modality in INPUT_MODALITIES.values() and (t.config is None or family.tower_config(config, t))}
    return {TOWER_CONFIG_KEYS[key] for _, sub in _sub_configs(config) for key in sub
            if key in TOWER_CONFIG_KEYS and isinstance(sub[key], dict)}


def modality_token_ids(config: dict[str, Any]) -> list[TokenId]:
    """Every special token id config.json gives a modality, in file order."""
    found = []
    for path, sub in _sub_configs(config):
        for key, value in sub.items():
            match = _TOKEN_ID_KEY.match(key)
            if match:
                found.append(TokenId(f"{path}.{key}" if path else key, match[1], _TOKEN_MODALITY[match[1]], value))
    return found


def text_vocab_size(config: dict[str, Any], family: Family | None) -> int | None:
    """Rows of the decoder's embedding: every token id must stay below it."""
    value = family.read(config, "vocab_size") if family is not None else config.get("vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def max_context(config: dict[str, Any], family: Family | None) -> int | None:
    """The context config.json gives the decoder (max_position_embeddings)."""
    text = family.text_config(config) if family is not None else config
    value = text.get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# ── source-config ───────────────────────────────────────────────────────────


def source_config_problems(stage: SourceConfigStage, *, where: str, config: dict[str, Any], family: Family | None,
                           extends: Sequence[ContextExtendStage], base_model: str) -> list[DeclarationProblem]:
    """What `stage` declares that this checkpoint contradicts.

    `extends` are the context-extend stages that may lengthen the context
    before the model is finished (the plan passes all of the alloy's; the
    station, which sees the model as it is now, passes the later ones).
    """
    return [*_context_problems(stage, where, config, family, extends),
            *_modality_list_problems(stage, where, config, family),
            *_tokenizer_problems(stage, where, base_model)]


def _context_problems(stage: SourceConfigStage, where: str, config: dict[str, Any], family: Family | None,
                      extends: Sequence[ContextExtendStage]) -> Iterator[DeclarationProblem]:
    wanted = stage.context_length
    if wanted is None:
        return
    path = f"{where}.contextLength"
    native = max_context(config, family)
    if native is None:
        yield DeclarationProblem(path, wanted, "cannot be checked: the source's config.json states no "
                                               "max_position_embeddings", "drop contextLength, or use a checkpoint "
                                                                          "whose config states its context")
        return
    reached = max([native, *(s.target_length for s in extends)])
    if wanted > reached:
        longest = (f"and the longest context-extend targetLength is {max(s.target_length for s in extends)}"
                   if extends else "and no context-extend stage lengthens it")
        yield DeclarationProblem(path, wanted, f"is longer than the source's context "
                                               f"(max_position_embeddings {native}) {longest}",
                                 f"add a context-extend stage with targetLength >= {wanted} after the "
                                 f"source-config stage, or lower contextLength to at most {reached}")


def _modality_list_problems(stage: SourceConfigStage, where: str, config: dict[str, Any],
                            family: Family | None) -> Iterator[DeclarationProblem]:
    towers = tower_modalities(config, family)
    for j, name in enumerate(stage.input_modalities or []):
        path = f"{where}.inputModalities[{j}]"
        modality = INPUT_MODALITIES.get(name)
        if modality is None:
            yield DeclarationProblem(path, name, "is not an input modality this factory knows",
                                     f"use one of {', '.join(INPUT_MODALITIES)}")
        elif modality != TEXT and modality not in towers:
            yield DeclarationProblem(path, name, _no_tower(modality, family, towers), _no_tower_fix(modality))


def _no_tower(modality: str, family: Family | None, towers: set[str]) -> str:
    has = f"its towers: {', '.join(sorted(towers))}" if towers else "it is text-only"
    name = family.name if family is not None else "the source"
    return f"needs {_a(modality)} tower, but {name} has none ({has}); this factory does not graft encoders"


def _no_tower_fix(modality: str) -> str:
    return f"drop it, or start from a checkpoint that has {_a(modality)} tower (e.g. a -VL or -Omni model)"


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _tokenizer_problems(stage: SourceConfigStage, where: str, base_model: str) -> Iterator[DeclarationProblem]:
    declared = stage.tokenizer
    if declared is None or declared.strip().rstrip("/") == base_model.strip().rstrip("/"):
        return
    yield DeclarationProblem(f"{where}.tokenizer", declared,
                             f"names a tokenizer other than the source's ({base_model}); the factory never swaps "
                             "a model's tokenizer, because its embedding and lm_head rows are the source "
                             "tokenizer's ids", f"set tokenizer to {base_model!r} or drop it")


# ── modality ────────────────────────────────────────────────────────────────


def modality_problems(stage: ModalityStage, *, where: str, config: dict[str, Any],
                      family: Family | None) -> list[DeclarationProblem]:
    """What a modality stage asks that this checkpoint (or this line) cannot give.

    `multimodal` asks for the towers the model has, at least one; `vision`
    and `audio` for that tower. Token ids are checked against the embedding
    here; the station checks them against the real tokenizer.
    """
    towers = tower_modalities(config, family)
    problems = []
    if stage.modality == "multimodal" and not towers:
        problems.append(DeclarationProblem(f"{where}.modality", stage.modality, _no_tower("non-text", family, towers),
                                           _no_tower_fix("vision or audio")))
    elif stage.modality != "multimodal" and stage.modality not in towers:
        problems.append(DeclarationProblem(f"{where}.modality", stage.modality,
                                           _no_tower(stage.modality, family, towers), _no_tower_fix(stage.modality)))
    if not stage.freeze_encoder:
        problems.append(DeclarationProblem(f"{where}.freezeEncoder", stage.freeze_encoder,
                                           "asks to train the encoder; this line keeps every non-text tower "
                                           "bit-exact and proves it after each stage that writes weights",
                                           "set freezeEncoder to true (the default)"))
    problems.extend(_token_id_problems(f"{where}.modality", config, family, towers))
    return problems


def _token_id_problems(path: str, config: dict[str, Any], family: Family | None,
                       towers: set[str]) -> Iterator[DeclarationProblem]:
    """A tower's special token ids must be ids the decoder can embed."""
    vocab = text_vocab_size(config, family)
    for token in modality_token_ids(config):
        if token.modality not in towers:
            continue
        said = f"the source's config.json {token.key} = {token.token_id!r}"
        if not isinstance(token.token_id, int) or isinstance(token.token_id, bool) or token.token_id < 0:
            yield DeclarationProblem(path, token.token_id, f"{said} is not a token id",
                                     "fix the checkpoint's config.json (a non-negative integer)")
        elif vocab is not None and token.token_id >= vocab:
            yield DeclarationProblem(path, token.token_id, f"{said} is past the decoder's embedding (vocab_size "
                                                           f"{vocab}), so the model cannot read that token",
                                     "use the checkpoint's own config.json; its token ids and vocab_size disagree")


# ── the plan's entry point ──────────────────────────────────────────────────


def declaration_problems(stages: Sequence[Stage], *, config: dict[str, Any], family: Family | None,
                         base_model: str) -> list[DeclarationProblem]:
    """Every source-config and modality declaration of an alloy's stages
    that the source's config.json contradicts (plan time)."""
    extends = [s for s in stages if isinstance(s, ContextExtendStage)]
    problems: list[DeclarationProblem] = []
    for i, stage in enumerate(stages):
        where = f"$.stages[{i}]"
        if isinstance(stage, SourceConfigStage):
            problems += source_config_problems(stage, where=where, config=config, family=family, extends=extends,
                                               base_model=base_model)
        elif isinstance(stage, ModalityStage):
            problems += modality_problems(stage, where=where, config=config, family=family)
    return problems

"""What the UI talks to: the store, the generation engine, the pair queue and the job runner, wired once.

Everything the web handlers do that is not drawing goes through here, so the handlers stay plain functions
and the same operations serve the page, the named API endpoints and the tests.
"""

from __future__ import annotations

import sys
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from labeling.arena import GateRule, best_passing, current_verdict, judge, model_name
from storage.db import CHOICES, canonical_messages
from storage.promotions import candidates, same_base, serve, version_status
from storage.ratings import battle_counts, head_to_head
from storage.rows import is_unicode
from storage.scores import comparison_scores
from storage.tallies import vote_counts

MAX_PROMPT_CHARS = 8_000  # longer than the bundled model's useful context; bigger input is rejected, not cut
MAX_RATIONALE_CHARS = 4_000
MAX_EDIT_CHARS = 20_000
# Unicode categories no name may hold: controls, invisible format characters (zero-width, right-to-left override:
# a name that looks like someone else's), line and paragraph separators, lone surrogates
HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def pair_number(pair_id) -> int:
    """A pair id as a client sends it: a whole number, or its digits as text (1.9, True or "1_0" are no pair)."""
    if isinstance(pair_id, int) and not isinstance(pair_id, bool):
        return pair_id
    if isinstance(pair_id, str) and pair_id.strip().isascii() and pair_id.strip().isdigit():
        return int(pair_id.strip())
    raise UserError(f"There is no pair {str(pair_id)[:40]!r}.")


def other_base(store, version: dict) -> str | None:
    """Why `version` cannot serve on this app's base model (version 0's base_model, set from --model), or None: an
    adapter fits only the base it was trained on."""
    base, trained_on = (store.get_version(0) or {}).get("base_model"), version.get("base_model")
    if version["id"] == 0 or not base or not trained_on or same_base(trained_on, base):
        return None
    return (
        f"Version {version['id']} was trained on the base model {trained_on}, but this app runs {base}: "
        f"start it with --model {trained_on} to serve it."
    )


class UserError(ValueError):
    """A message for the person at the page; shown as is, nothing written."""


@dataclass
class Services:
    store: object
    engine: object
    queue: object
    runner: object
    guidelines: str = ""
    gate: GateRule = field(default_factory=GateRule)  # the promotion gate (labeling/arena.py)
    arena: object = None  # the GateWatcher, poked after votes
    training_switch: object = None  # labeling/deploy.py TrainingSwitch: off on a CPU Space until an admin allows
    # held while the served version changes and while the gate decides on the serving version (re-entrant: the gate
    # promotes under it)
    version_lock: threading.RLock = field(default_factory=threading.RLock)
    _streaming: set[str] = field(default_factory=set)  # annotators with an own-prompt stream running
    _streaming_lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- annotators and votes ---------------------------------------------------------------------------
    def annotator_name(self, name: str | None) -> str:
        if name is not None and not isinstance(name, str):
            raise UserError("A name is text.")
        name = (name or "").strip()
        if not name:
            raise UserError("Tell us your name first: every vote records who cast it.")
        if (
            len(name) > 64
            or any(ch in "<>" or unicodedata.category(ch) in HIDDEN for ch in name)
            or not is_unicode(name)
        ):
            raise UserError("Names are at most 64 characters, without < >, line breaks or control characters.")
        return name

    def next_pair(self, annotator: str) -> dict | None:
        return self.queue.next_pair(self.annotator_name(annotator))

    def vote(self, pair_id, annotator: str, choice: str, rationale: str = "", edited: str = "", seconds=None) -> int:
        annotator = self.annotator_name(annotator)
        if choice not in CHOICES:
            raise UserError(f"Unknown choice {choice!r}: use {', '.join(CHOICES)}.")
        pair_id = pair_number(pair_id)
        if not all(isinstance(text, str | None) for text in (rationale, edited)):
            raise UserError("The rationale and the edited answer are text.")
        rationale, edited = (rationale or "").strip(), (edited or "").strip()
        if len(rationale) > MAX_RATIONALE_CHARS:
            raise UserError(f"The rationale is over {MAX_RATIONALE_CHARS} characters.")
        if len(edited) > MAX_EDIT_CHARS:
            raise UserError(f"The edited answer is over {MAX_EDIT_CHARS} characters.")
        if edited and self._same_as_an_answer(pair_id, edited):
            edited = ""  # an unchanged answer is no edit: it would pair the answer with itself in training data
        try:
            comparison_id = self.queue.record_vote(
                pair_id,
                annotator,
                choice,
                rationale=rationale or None,
                edited_answer=edited or None,
                time_spent_s=seconds,
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if self.arena is not None:
            self.arena.poke()  # the gate looks again once this burst of votes is in
        return comparison_id

    def _same_as_an_answer(self, pair_id: int, edited: str) -> bool:
        """Whether the (stripped) edit equals either answer of the pair, surrounding whitespace aside. An unknown
        pair is left to record_vote, which refuses it with its reason."""
        try:
            view = self.queue.pair_view(pair_id)
        except KeyError:
            return False
        return edited in ((view.get("answer_a") or "").strip(), (view.get("answer_b") or "").strip())

    def pair_answer(self, pair_id, side: str, annotator: str) -> str:
        """The raw text of one side of a pair, for the person who holds its lease (nobody else may look it up)."""
        annotator = self.annotator_name(annotator)
        if side not in ("answer_a", "answer_b"):
            raise UserError(f"Unknown side {side!r}.")
        if pair_id in (None, ""):
            raise UserError("No pair on screen.")
        pair_id = pair_number(pair_id)
        if self.queue.lease_holder(pair_id) != annotator:
            raise UserError(f"Pair {pair_id} is not leased to you.")
        return self.queue.pair_view(pair_id)[side]

    def undo(self, annotator: str) -> int | None:
        return self.queue.undo_last(self.annotator_name(annotator))

    def counters(self, annotator: str | None) -> dict:
        total, mine = vote_counts(self.store, annotator)  # kept counts, not a scan per vote
        return {"mine_today": mine, "total": total, "queue": self.queue.depth(annotator)}  # pairs left for them

    # ---- own prompts ------------------------------------------------------------------------------------
    def check_prompt(self, text: str) -> list[dict]:
        text = (text or "").strip()
        if not text:
            raise UserError("Type a prompt first.")
        if len(text) > MAX_PROMPT_CHARS:
            raise UserError(f"That prompt has {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}.")
        try:
            return canonical_messages(text)
        except ValueError as exc:
            raise UserError(str(exc)) from None

    def stream_own(self, annotator: str, messages: list[dict]) -> OwnPairStream:
        """Both sides answer a typed prompt live; once done, the pair is stored and leased to this person.
        One stream per person at a time; use it as a context manager so leaving early cancels the engine rows."""
        annotator = self.annotator_name(annotator)
        if self.engine.fit(messages, self.queue.params.max_new_tokens) != messages:  # the pair queue would cut it
            raise UserError("That prompt is too long for the model's context with room for the answers: shorten it.")
        with self._streaming_lock:
            if annotator in self._streaming:
                raise UserError("Your own prompt is still being answered: wait for it (one at a time).")
            self._streaming.add(annotator)
        return OwnPairStream(self, annotator, messages)

    def _stream_done(self, annotator: str) -> None:
        with self._streaming_lock:
            self._streaming.discard(annotator)

    def reward_scores(self, comparison_ids: list[int]) -> dict[int, tuple[float | None, float | None]]:
        """Reward-model scores of both answers of each comparison (empty until a reward model was trained)."""
        return comparison_scores(self.store, [i for i in comparison_ids if i is not None])

    # ---- versions -----------------------------------------------------------------------------------------
    def activate(self, version_id: int, actor: str | None = None) -> str:
        """An admin serves a version from now on, without restarting, gate or not: a 'rollback' row when it served
        before, else an 'override' row, each with its record against the version serving until now."""
        version_id = int(version_id)
        with self.version_lock:
            serving = self.engine.active_version
            if version_id == serving:
                self._serve(version_id)  # checks its folder and refreshes the queue; no promotion (an adapter
                # already loaded is not read again: one replaced on disk serves from the next start)
                return f"Version {version_id} is already serving."
            kind = "rollback" if version_status(self.store, version_id) == "retired" else "override"
            record = head_to_head(self.store, model_name(version_id), model_name(serving), self.gate.confidence)
            evidence = {"candidate": model_name(version_id), "against": model_name(serving), **record}
            self._serve(version_id, serving, kind, evidence, actor)
        return f"Version {version_id} is now serving ({kind}); new pairs come from it."

    def promote(self, version_id: int | None = None, actor: str | None = None, auto: bool = False) -> str:
        """Serve a candidate that passes the gate (default: the best passing one); refused otherwise."""
        with self.version_lock:
            serving = self.engine.active_version
            waiting = [c["id"] for c in candidates(self.store) if c["id"] != serving]
            if version_id is None and not waiting:
                raise UserError("No candidate is waiting: train a policy version first.")
            if version_id is not None and int(version_id) not in waiting:
                raise UserError(f"Version {version_id} is not a candidate.")
            counts = battle_counts(self.store)
            if version_id is None:  # the best that passes, else the one the arena judges now (as the tab shows)
                verdict = best_passing([judge(counts, c, serving, self.gate) for c in waiting]) or current_verdict(
                    self.store, serving, self.gate, self.queue.broken
                )
                if verdict is None:  # every waiting candidate's adapter is gone or does not load
                    raise UserError("No candidate can be judged: its adapter is missing or does not load.")
            else:
                verdict = judge(counts, int(version_id), serving, self.gate)
            version_id = verdict.candidate
            if not verdict.passed:
                raise UserError(f"Not promoted: {verdict.summary()}")
            self._serve(version_id, serving, "auto" if auto else "gate", verdict.evidence(), actor)
        return f"Version {version_id} is now serving (promoted by the gate). {verdict.summary()}"

    def _serve(
        self,
        version_id: int,
        from_version: int | None = None,
        kind: str | None = None,
        evidence: dict | None = None,
        actor: str | None = None,
    ) -> None:
        """Load the adapter, switch the engine, remember it, log the promotion (`kind`), refresh the queue."""
        version = self.store.get_version(version_id)
        if version is None or version.get("kind", "policy") != "policy":
            raise UserError(f"There is no policy version {version_id}.")
        if (wrong_base := other_base(self.store, version)) is not None:
            raise UserError(wrong_base)
        if version.get("adapter_path"):
            if not Path(version["adapter_path"]).is_dir():
                raise UserError(f"The adapter folder of version {version_id} is gone: {version['adapter_path']}")
            self.engine.load_version(version_id, version["adapter_path"])
        self.engine.set_active(version_id)
        self.store.set_setting("active_version", str(version_id))
        if kind is not None:
            serve(self.store, version_id, from_version, kind, evidence or {}, actor)
        self.queue.on_version_change(version_id)

    def free_adapters(self) -> list[int]:
        """Unload the adapters no pair needs any more (rejected candidates, retired versions) from the in-process
        engine; the ids freed. Under the activation lock: a version being served again is not unloaded meanwhile."""
        unload = getattr(self.engine, "unload_versions", None)  # vLLM manages its own LoRA cache
        if unload is None:
            return []
        with self.version_lock:
            return unload(keep={c["id"] for c in candidates(self.store)})

    def follow_serving(self) -> None:
        """Serve what another app process on the same PostgreSQL store activated or promoted (its setting)."""
        saved = self.store.get_setting("active_version")
        if saved and saved.isdigit() and int(saved) != self.engine.active_version:
            with self.version_lock:
                self._serve(int(saved))

    def restore_active_version(self) -> None:
        saved = self.store.get_setting("active_version")
        if saved and saved != "0":
            try:
                with self.version_lock:
                    self._serve(int(saved))
            except Exception as exc:  # another base (--model changed) or an adapter that no longer loads
                print(f"warning: serving the base version: saved version {saved} cannot serve: {exc}", file=sys.stderr)


class OwnPairStream:
    """Iterate for cumulative (text A, text B); afterwards `.pair` is the stored, leased pair (queue format).

    Leaving the `with` block before the end (the browser went away) cancels both rows in the engine."""

    def __init__(self, services: Services, annotator: str, messages: list[dict]):
        self.services, self.annotator, self.messages = services, annotator, messages
        self.pair: dict | None = None
        self._stream = None

    def __enter__(self) -> OwnPairStream:
        return self

    def __exit__(self, *exc) -> None:
        if self._stream is not None and self.pair is None:
            self._stream.cancel()
        self.services._stream_done(self.annotator)

    def __iter__(self):
        queue = self.services.queue
        version = self.services.engine.active_version
        params_a, params_b = queue.pair_params()
        self._stream = self.services.engine.stream_pair(self.messages, params_a, params_b, version, version)
        yield from self._stream
        gen_a, gen_b = self._stream.result
        self.pair = queue.add_own_pair(self.annotator, self.messages, gen_a, gen_b)

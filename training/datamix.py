"""The Train tab's **Auto** method: pick DPO, KTO or SFT-then-DPO from the mix of judgements, and say why.

Light imports only (the app imports this through training.runner). The rule, in order:
1. edited answers make up at least EDIT_SHARE of the judgements → **SFT-then-DPO**: an edit is a demonstration of
   the wanted answer, which supervised fine-tuning learns directly; DPO then learns the A/B preferences from there.
2. "both bad" votes make up at least BOTH_BAD_SHARE of the judgements, or there are too few clear pairs for DPO
   but enough labelled answers → **KTO**: DPO needs a winner and a loser, so it would drop those votes; KTO learns
   from every labelled answer (a both-bad vote gives two undesirable ones).
3. otherwise → **DPO** on the clear pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_METHOD = "dpo"  # the Train tab's preselected method and bench/loop.py's
EDIT_SHARE = 0.1
BOTH_BAD_SHARE = 0.25
MIN_ROWS = 4  # as training.runner.MIN_PAIRS


@dataclass(frozen=True)
class DataMix:
    judgements: int  # effective comparisons with a verdict (A, B, tie, both_bad)
    clear: int  # A or B
    ties: int
    both_bad: int
    edited: int  # judgements with an edited answer
    pairs: int  # rows of the dpo export (clear pairs + an edit over each original)
    kto_rows: int  # rows of the kto export

    def describe(self) -> str:
        return (
            f"{self.judgements} judgements: {self.clear} A/B, {self.ties} ties, {self.both_bad} both bad, "
            f"{self.edited} edited"
        )


def data_mix(store) -> DataMix:
    from storage.exporters import export_rows
    from storage.tallies import WHITESPACE

    with store.read() as cur:
        counts = dict(cur.execute("SELECT choice, count(*) FROM effective_comparisons GROUP BY 1").fetchall())
        edited = cur.execute(
            "SELECT count(*) FROM effective_comparisons WHERE edited_answer IS NOT NULL "
            "AND trim(edited_answer, ?) <> ''",  # what str.strip() removes, as the exports check (not spaces only)
            [WHITESPACE],
        ).fetchone()[0]
    return DataMix(
        judgements=sum(counts.get(c, 0) for c in ("A", "B", "tie", "both_bad")),
        clear=counts.get("A", 0) + counts.get("B", 0),
        ties=counts.get("tie", 0),
        both_bad=counts.get("both_bad", 0),
        edited=int(edited),
        pairs=len(export_rows(store, "dpo")),
        kto_rows=len(export_rows(store, "kto")),
    )


def choose_method(mix: DataMix) -> tuple[str, str]:
    """(method, reason): the method for this data and one sentence on why, shown with the run."""
    n = max(mix.judgements, 1)
    if mix.edited and mix.edited >= EDIT_SHARE * n and mix.pairs >= MIN_ROWS:
        return "sft_dpo", (
            f"Auto chose SFT-then-DPO: {mix.edited} of {mix.judgements} judgements carry an edited answer "
            f"(≥ {EDIT_SHARE:.0%}), so the model first learns the chosen and edited answers, then DPO learns the "
            f"{mix.pairs} preference pairs from there. {mix.describe()}."
        )
    if mix.kto_rows >= MIN_ROWS and (mix.both_bad >= BOTH_BAD_SHARE * n or mix.pairs < MIN_ROWS):
        why = (
            f"{mix.both_bad} of {mix.judgements} judgements are 'both bad' (≥ {BOTH_BAD_SHARE:.0%}), which DPO "
            "cannot use"
            if mix.both_bad >= BOTH_BAD_SHARE * n
            else f"only {mix.pairs} clear pairs, too few for DPO"
        )
        return "kto", (
            f"Auto chose KTO: {why}; KTO learns from all {mix.kto_rows} labelled answers. {mix.describe()}."
        )
    return "dpo", (
        f"Auto chose DPO: {mix.pairs} clear preference pairs, few both-bad votes and edits. {mix.describe()}."
    )


EXPORT_FORMATS = {"dpo": "dpo", "sft_dpo": "dpo", "reward": "reward", "kto": "kto", "sft": "sft"}
PAIRS = "preference pairs (A or B better, or an edited answer)"
ROW_KINDS = {
    "dpo": PAIRS,
    "sft_dpo": PAIRS,
    "reward": PAIRS,
    "kto": "labelled answers (A or B better, both bad, or an edited answer)",
    "sft": "chosen or edited answers (A or B better, or an edited answer)",
}


def resolve_method(store, method: str) -> tuple[str, str | None]:
    """(the method to run, why): 'auto' becomes dpo, kto or sft_dpo with its reason; any other stays as it is."""
    return choose_method(data_mix(store)) if method == "auto" else (method, None)

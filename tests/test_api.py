"""Scripts drive labeling through the named endpoints `next_pair` and `vote` (gradio_client, real server)."""

from __future__ import annotations

import json
import threading

import pytest

from generation.defaults import REPETITION_PENALTY
from tests.apphelpers import running_app

pytestmark = pytest.mark.slow

CLIENTS = 8
VOTES_EACH = 3


def test_eight_concurrent_clients_every_vote_stored_once(tmp_path, tiny_model_dir):
    from gradio_client import Client

    with running_app(tmp_path, tiny_model_dir, queue_size=CLIENTS * VOTES_EACH, wait_pairs=CLIENTS * VOTES_EACH) as (
        url,
        services,
    ):
        voted: dict[str, list[int]] = {}
        errors: list[BaseException] = []

        def bot(name: str, choice: str) -> None:
            try:
                client = Client(url, verbose=False)
                mine = []
                while len(mine) < VOTES_EACH:
                    pair_id, prompt, answer_a, answer_b = client.predict(name, api_name="/next_pair")
                    if pair_id is None:
                        continue
                    assert prompt and isinstance(answer_a, str) and isinstance(answer_b, str)
                    assert client.predict(pair_id, name, choice, "bot", "", api_name="/vote") == "ok"
                    mine.append(int(pair_id))
                voted[name] = mine
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)

        choices = ["A", "B", "tie", "both_bad"]
        threads = [threading.Thread(target=bot, args=(f"bot{i}", choices[i % 4])) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert not errors, errors
        with services.store.read() as cur:
            stored = cur.execute("SELECT pair_id, annotator, choice FROM effective_comparisons").fetchall()
        assert len(stored) == CLIENTS * VOTES_EACH
        assert len({pair for pair, _, _ in stored}) == CLIENTS * VOTES_EACH  # no pair judged twice
        for i in range(CLIENTS):
            name = f"bot{i}"
            theirs = sorted(pair for pair, who, choice in stored if who == name and choice == choices[i % 4])
            assert theirs == sorted(voted[name])
        with services.store.read() as cur:  # the app's generation default is on every pair it made
            rows = cur.execute("SELECT params FROM generations").fetchall()
        penalties = {json.loads(params)["repetition_penalty"] for (params,) in rows}
        assert penalties == {REPETITION_PENALTY} and REPETITION_PENALTY > 1

        # Bad calls: a clear error, nothing stored.
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="no pair 999999|unknown pair|not found|does not exist"):
            client.predict(999999, "bot0", "A", "", "", api_name="/vote")
        pair_id, *_ = client.predict("carol", api_name="/next_pair")
        if pair_id is not None:
            with pytest.raises(Exception, match="choice"):
                client.predict(pair_id, "carol", "maybe", "", "", api_name="/vote")
            with pytest.raises(Exception, match="name"):
                client.predict(pair_id, "", "A", "", "", api_name="/vote")
            with pytest.raises(Exception, match="control characters"):
                client.predict(pair_id, "carol\x1b[2J", "A", "", "", api_name="/vote")
            with pytest.raises(Exception, match="rationale holds a character that is not valid Unicode"):
                client.predict(pair_id, "carol", "A", "bad \ud800", "", api_name="/vote")  # JSON's "\ud800"
        with services.store.read() as cur:
            assert cur.execute("SELECT count(*) FROM effective_comparisons").fetchone()[0] == CLIENTS * VOTES_EACH

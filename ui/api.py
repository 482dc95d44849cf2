"""The named endpoints scripts call: `/next_pair` and `/vote` (the same services and checks as the page)."""

from __future__ import annotations

import sys

import gradio as gr

from labeling.access import Access, AccessDenied
from labeling.services import Services, UserError


def register_api(services: Services, access: Access) -> None:
    def next_pair(annotator: str, request: gr.Request) -> tuple[int | None, str, str, str]:
        """Lease the next pair to `annotator` (under logins: yourself): (pair id, or None when the queue is empty;
        prompt; answer A; answer B)."""
        try:
            nxt = services.next_pair(access.annotator(request, annotator))
        except (UserError, AccessDenied) as exc:
            raise gr.Error(str(exc)) from None
        except Exception as exc:  # no internal detail to the caller; the server's log has it
            raise internal_error("next_pair", exc) from None
        if nxt is None:
            return None, "", "", ""
        return nxt["pair_id"], prompt_markdown(nxt["messages"]), nxt["answer_a"], nxt["answer_b"]

    def vote(
        pair_id: int,
        annotator: str,
        choice: str,
        rationale: str = "",
        edited_answer: str = "",
        request: gr.Request = None,
    ) -> str:
        """Record a judgement of a leased pair: choice is A, B, tie, both_bad or skip. Returns "ok"."""
        try:
            services.vote(pair_id, access.annotator(request, annotator), choice, rationale, edited_answer)
        except (UserError, AccessDenied) as exc:
            raise gr.Error(str(exc)) from None
        except Exception as exc:
            raise internal_error("vote", exc) from None
        return "ok"

    gr.api(next_pair, api_name="next_pair", concurrency_limit=None)
    gr.api(vote, api_name="vote", concurrency_limit=None)


def internal_error(endpoint: str, exc: Exception) -> gr.Error:
    """One line in the server's log; the caller gets no internal detail."""
    print(f"/{endpoint} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return gr.Error(f"/{endpoint} could not handle that request (check the arguments' types).")


def prompt_markdown(messages: list[dict]) -> str:
    """The prompt as scripts have always received it: `**role:** text` per message (`*system:*` for system)."""
    return "\n\n".join(
        f"*system:* {m['content']}" if m["role"] == "system" else f"**{m['role']}:** {m['content']}" for m in messages
    )

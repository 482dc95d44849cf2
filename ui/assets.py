"""What the page carries besides components: keyboard shortcuts (a <script> in the head) and a little CSS."""

from __future__ import annotations

import json

HOTKEYS = {
    "1": "vote-a",
    "a": "vote-a",
    "2": "vote-b",
    "b": "vote-b",
    "3": "vote-tie",
    "t": "vote-tie",
    "4": "vote-bad",
    "x": "vote-bad",
    "s": "skip-btn",
    "u": "undo-btn",
}
KEYBOARD_JS = (
    "<script>\nconst PREFLOOP_KEYS = "
    + json.dumps(HOTKEYS)
    + """;
document.addEventListener("keydown", (event) => {
  const tag = (event.target.tagName || "").toLowerCase();
  if (tag === "input" || tag === "textarea" || event.target.isContentEditable) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.repeat) return;  // a held key is one vote, not one per auto-repeat
  const id = PREFLOOP_KEYS[event.key.toLowerCase()];
  if (!id) return;
  const button = document.getElementById(id);
  // offsetParent is null while the button is not shown (another tab is open): no vote for an unseen pair
  if (button && !button.disabled && button.offsetParent !== null) { event.preventDefault(); button.click(); }
});
</script>"""
)
CSS = """
.answer { min-height: 8em; border: 1px solid var(--border-color-primary); padding: 0.5em; border-radius: 6px; }
.answer, #prompt { overflow-wrap: anywhere; overflow-x: auto; max-width: 100%; min-width: 0; }
.answer pre, .answer table, #prompt pre, #prompt table { overflow-wrap: anywhere; overflow-x: auto; max-width: 100%; }
.answer table, #prompt table { display: block; }
.blocked-image { color: var(--body-text-color-subdued); font-style: italic; }
.truncated { color: #b45309; font-weight: bold; }
"""
SHORTCUTS_MD = (
    "**Keys:** `1`/`a` A better · `2`/`b` B better · `3`/`t` tie · `4`/`x` both bad · `s` skip · `u` undo "
    "(not while typing in a box)."
)

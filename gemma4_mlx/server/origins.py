"""Which web pages may call the server: CORS (docs/serving.md §1.1).

A page in a browser may read the server's answers only if the server names its
origin in CORS headers, and a page's JSON POST is sent only after a preflight the
server allows. Any page the user visits could otherwise drive a model on their
machine, so by default only local pages are allowed (`LOCAL`: localhost and the
loopback addresses on any port, and the schemes of desktop apps built on web views:
Electron's `app://`, Tauri's, VS Code's web views). `serve --cors-origin` adds
origins (`https://chat.example.com`, globs such as `chrome-extension://*`), `*`
allows every page, `none` sends no CORS headers at all.

A request that carries an `Origin` header the server does not allow is refused
with a 403 that says how to allow it, not served blind: its page could not read the
answer anyway. Clients that are not browsers send no `Origin` and are not affected.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LOCAL = "local"
ANY = "*"
NONE = "none"
_LOCAL = re.compile(
    r"https?://(localhost|127\.0\.0\.1|\[::1\]|0\.0\.0\.0)(:[0-9]+)?|(app|tauri|vscode-webview|vscode-file)://[^/]*"
)
# an origin is scheme://host[:port] (lower case, as browsers send it); `*` in a pattern
# stands for any run of characters but `/`
_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://(\[[0-9a-f:.*]+\]|[^/\s?#:\[\]@]+)(:([0-9]+|\*))?|null")
# A host name has at most 253 characters: a longer Origin is never allowed (nor
# matched: matching runs on the event loop, before the key is checked).
MAX_ORIGIN = 300
# the headers the browser lets a page read beyond the safelisted ones (a 429's wait)
EXPOSED = ("Retry-After",)


class Origins:
    """The origins given to `serve --cors-origin` / `app(cors_origins=...)`."""

    def __init__(self, given: Sequence[str] = (LOCAL,)):
        if isinstance(given, str):
            given = [given]
        given = [g.strip() for g in given]
        if NONE in given and len(given) > 1:
            raise ValueError(f"cors origins {given}: 'none' cannot be combined with other origins")
        self.enabled = NONE not in given and bool(given)
        self.any = ANY in given
        self.local = LOCAL in given
        self.patterns = [_checked(g.lower()) for g in given if g not in (ANY, NONE, LOCAL)]

    def allows(self, origin: str) -> bool:
        if not self.enabled or len(origin) > MAX_ORIGIN:
            return self.enabled and self.any
        origin = origin.lower()  # scheme and host are case-blind (browsers send lower case)
        if self.any or (self.local and _LOCAL.fullmatch(origin)):
            return True
        return any(_glob_match(p, origin) for p in self.patterns)

    def middleware_options(self) -> dict:
        """Keyword arguments of Starlette's `CORSMiddleware` for these origins: any
        method and header a client library sends (the SDKs add their own
        `x-stainless-*` and `anthropic-*` headers); the key travels in a header, never
        a cookie, so no credentials; the Private Network Access preflight header is
        answered for browsers that send it (a public page allowed on purpose)."""
        return dict(
            allow_origins=[ANY] if self.any else [],  # else the middleware asks `allows`
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=[ANY],
            allow_private_network=True,
            expose_headers=list(EXPOSED),
            max_age=600,
        )


def is_origin(text: str) -> bool:
    """Whether `text` has an origin's form (what `--cors-origin` takes)."""
    return len(text) <= MAX_ORIGIN and _ORIGIN.fullmatch(text) is not None


def _checked(origin: str) -> str:
    """A given origin (or glob), checked for the usual mistakes (a path or a trailing
    slash: browsers never send one)."""
    if not is_origin(origin):
        raise ValueError(
            f"cors origin {origin!r}: expected scheme://host[:port] (no path, no trailing slash), "
            "a glob such as chrome-extension://*, 'local', '*' or 'none'"
        )
    return origin


def _glob_match(pattern: str, text: str) -> bool:
    """Whether `text` matches `pattern`, whose `*` stands for any run of characters
    but `/`. Only the latest `*` is ever retried (no regular expression, so no
    backtracking blow-up on long input: at most len(pattern) x len(text) steps)."""
    p = t = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, mark, p = p, t, p + 1
        elif p < len(pattern) and pattern[p] == text[t]:
            p, t = p + 1, t + 1
        elif star >= 0 and text[mark] != "/":
            mark += 1
            p, t = star + 1, mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)

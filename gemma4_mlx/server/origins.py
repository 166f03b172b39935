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
_LOCAL_REGEX = (
    r"https?://(localhost|127\.0\.0\.1|\[::1\]|0\.0\.0\.0)(:[0-9]+)?|(app|tauri|vscode-webview|vscode-file)://[^/]*"
)
# an origin is scheme://host[:port]; `*` in a pattern stands for any run of those characters
_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://[^/\s?#]+|null")
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
        patterns = [_LOCAL_REGEX if g == LOCAL else _pattern(g) for g in given if g not in (ANY, NONE)]
        self.regex = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self.given = given

    def allows(self, origin: str) -> bool:
        if not self.enabled:
            return False
        return self.any or (self.regex is not None and self.regex.fullmatch(origin) is not None)

    def middleware_options(self) -> dict:
        """Keyword arguments of Starlette's `CORSMiddleware` for these origins: any
        method and header a client library sends (the SDKs add their own
        `x-stainless-*` and `anthropic-*` headers); the key travels in a header, never
        a cookie, so no credentials; the Private Network Access preflight header is
        answered for browsers that send it (a public page allowed on purpose)."""
        return dict(
            allow_origins=[ANY] if self.any else [],
            allow_origin_regex=None if self.any or self.regex is None else self.regex.pattern,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=[ANY],
            allow_private_network=True,
            expose_headers=list(EXPOSED),
            max_age=600,
        )


def _pattern(origin: str) -> str:
    """One given origin (or glob) as a regular expression, checked for the usual
    mistakes (a path or a trailing slash: browsers never send one)."""
    concrete = origin.replace("*", "x")
    if not _ORIGIN.fullmatch(concrete):
        raise ValueError(
            f"cors origin {origin!r}: expected scheme://host[:port] (no path, no trailing slash), "
            "a glob such as chrome-extension://*, 'local', '*' or 'none'"
        )
    return "[^/]*".join(re.escape(part) for part in origin.split("*"))

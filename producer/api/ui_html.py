"""Server-rendered HTML of the jobs page (/ui): pure functions from summaries to text.

Every value that comes from the database or the request goes through :func:`html.escape`. The page
needs no script and no external resource: one stylesheet, allowed by its hash in the
Content-Security-Policy (:data:`CSP`), and a meta refresh. Bar widths are classes (``w0`` .. ``w100``)
rather than style attributes, so the policy needs no ``'unsafe-inline'``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from html import escape
from typing import Any
from urllib.parse import quote

from imgq.db.jobs_page import JobSummary

REFRESH_S = 5

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{display:flex;align-items:center;gap:16px;padding:10px 24px;background:#1d2330;color:#fff}
header h1{font-size:17px;margin:0}header a{color:#fff}header form{margin-left:auto}
main{padding:16px 24px}table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:6px 8px;border-bottom:1px solid #e2e5ea;text-align:left;vertical-align:top}
th{font-size:12px;text-transform:uppercase;color:#5b6473}
code,.id{font-family:ui-monospace,monospace;font-size:12px}
.bar{display:flex;width:260px;height:12px;background:#e2e5ea;border-radius:6px;overflow:hidden}
.bar span{display:block;height:100%}.done{background:#2e9d5b}.dead{background:#d64545}
.cancelled{background:#8a929e}.running{background:#3b7ddd}.queued{background:#c6cdd8}
.counts{font-size:12px;color:#5b6473}.counts b{color:#1d2330;font-weight:600}
.codes span{display:inline-block;margin:0 4px 2px 0;padding:0 6px;border-radius:8px;background:#fbe3e3;
color:#8c1f1f;font-size:12px}
.note{padding:8px 12px;background:#e6f4ea;border-radius:4px}.err{background:#fbe3e3}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px}dt{color:#5b6473}dd{margin:0}
button{padding:4px 12px;cursor:pointer}
""" + "".join(f".w{n}{{width:{n}%}}" for n in range(101))

CSP = ("default-src 'none'; style-src 'sha256-"
       + base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
       + "'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _page(title: str, body: str, *, refresh_to: str | None = None, principal: Any = None, csrf: str = "",
          refresh_s: int = REFRESH_S) -> str:
    refresh = (f'<meta http-equiv="refresh" content="{refresh_s}; url={escape(refresh_to)}">'
               if refresh_to else "")
    who = ""
    if principal is not None:
        who = (f'<span>tenant <b>{escape(principal.tenant)}</b> · key <code>{escape(principal.key_id)}</code></span>'
               f'<form method="post" action="/ui/logout"><input type="hidden" name="csrf" value="{escape(csrf)}">'
               f'<button>Log out</button></form>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{refresh}'
            f'<meta name="referrer" content="no-referrer"><title>{escape(title)}</title>'
            f'<style>{_CSS}</style></head><body><header><h1><a href="/ui">imgq jobs</a></h1>{who}</header>'
            f'<main>{body}</main></body></html>')


def _when(value: dt.datetime | None) -> str:
    return "—" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def rate(job: JobSummary) -> str:
    return "—" if job.rate is None else f"{job.rate:.1f}/s"


def eta(job: JobSummary) -> str:
    if job.cancelled_at is not None and not job.pending:
        return "cancelled"
    if not job.pending:
        return "finished"
    return duration(job.eta_s)


def progress(job: JobSummary) -> str:
    """A stacked bar (done, dead, cancelled, running, queued) and the counts in words."""
    size = max(job.total - job.purged, 1)
    parts = [("done", job.done), ("dead", job.dead), ("cancelled", job.cancelled), ("running", job.running),
             ("queued", job.queued)]
    bar = "".join(f'<span class="{name} w{round(100 * n / size)}" title="{n} {name}"></span>'
                  for name, n in parts if n)
    words = [f"<b>{n}</b> {name}" for name, n in parts if n or name in ("done", "dead", "queued", "running")]
    if job.purged:
        words.append(f"<b>{job.purged}</b> purged")
    final = job.done + job.dead + job.cancelled
    return (f'<div class="bar" role="img" aria-label="{final} of {size} final">{bar}</div>'
            f'<div class="counts">{" · ".join(words)} · of {job.total}</div>')


def codes(job: JobSummary) -> str:
    if not job.dead_by_code:
        return "—"
    return '<div class="codes">' + "".join(f"<span>{escape(code)}: {n}</span>"
                                            for code, n in job.dead_by_code.items()) + "</div>"


def jobs_page(jobs: list[JobSummary], principal: Any, csrf: str) -> str:
    rows = "".join(
        f'<tr><td><a class="id" href="/ui/jobs/{job.id}">{job.id}</a></td><td>{escape(job.kind)}</td>'
        f"<td>{escape(job.source)}</td><td>{job.priority}</td><td>{_when(job.created_at)}</td>"
        f"<td>{progress(job)}</td><td>{rate(job)}</td><td>{eta(job)}</td><td>{codes(job)}</td></tr>"
        for job in jobs)
    if not rows:
        rows = '<tr><td colspan="9">No jobs yet.</td></tr>'
    body = ("<table><thead><tr><th>Job</th><th>Kinds</th><th>Source</th><th>Priority</th><th>Created</th>"
            "<th>Progress</th><th>Rate</th><th>ETA</th><th>Dead letters</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")
    return _page("imgq jobs", body, refresh_to="/ui", principal=principal, csrf=csrf)


def job_page(job: JobSummary, letters: list[dict[str, Any]], principal: Any, csrf: str, *,
             retried: int | None = None, cancelled: int | None = None, limit: int = 200) -> str:
    note = ""
    if retried is not None:
        note = f'<p class="note">{retried} dead letter{"s" * (retried != 1)} sent back to the queue.</p>'
    if cancelled is not None:
        note = f'<p class="note">Job cancelled: {cancelled} queued item{"s" * (cancelled != 1)} will never run.</p>'
    if job.queued and job.cancelled_at is None:
        # A page of its own to confirm on: this one reloads every few seconds.
        note += f'<p><a href="/ui/jobs/{job.id}/cancel">Cancel this job…</a></p>'
    facts = (f"<dl><dt>Job</dt><dd class=\"id\">{job.id}</dd><dt>Kinds</dt><dd>{escape(job.kind)}</dd>"
             f"<dt>Source</dt><dd>{escape(job.source)}</dd><dt>Priority</dt><dd>{job.priority}</dd>"
             f"<dt>Created</dt><dd>{_when(job.created_at)}</dd>"
             + (f"<dt>Cancelled</dt><dd>{_when(job.cancelled_at)}</dd>" if job.cancelled_at else "")
             + f"<dt>Progress</dt><dd>{progress(job)}</dd><dt>Rate</dt><dd>{rate(job)}</dd>"
             f"<dt>ETA</dt><dd>{eta(job)}</dd><dt>Dead letters</dt><dd>{codes(job)}</dd></dl>")
    retry = ""
    if job.dead and job.cancelled_at is None:
        retry = (f'<form method="post" action="/ui/jobs/{job.id}/retry-dead">'
                 f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
                 f"<button>Retry {job.dead} dead letter{'s' * (job.dead != 1)}</button></form>")
    rows = "".join(
        f"<tr><td>{d['seq']}</td><td><code>{escape(d['ref'])}</code></td><td>{escape(d['code'])}</td>"
        f"<td>{escape(d['message'])}</td><td>{d['attempts']}</td><td>{_when(d['created_at'])}</td></tr>"
        for d in letters)
    shown = (f"<p>The first {len(letters)} of {job.dead}, in seq order (<code>imgq dlq list --job {job.id}</code> "
             "lists them all).</p>" if job.dead > len(letters) else "")
    table = ("<h2>Dead letters</h2>" + retry + shown
             + "<table><thead><tr><th>Seq</th><th>Ref</th><th>Code</th><th>Message</th><th>Attempts</th>"
             f"<th>At</th></tr></thead><tbody>{rows or '<tr><td colspan=6>None.</td></tr>'}</tbody></table>")
    return _page(f"imgq job {job.id}", note + facts + table, refresh_to=f"/ui/jobs/{job.id}",
                 principal=principal, csrf=csrf)


def login_page(next_path: str, error: str | None = None) -> str:
    err = f'<p class="note err">{escape(error)}</p>' if error else ""
    body = (f"{err}<h2>Log in</h2><p>With an API key of your tenant, or open a one-time link from "
            "<code>POST /v1/ui-sessions</code> (docs/jobs-page.md).</p>"
            '<form method="post" action="/ui/login">'
            f'<input type="hidden" name="next" value="{escape(next_path)}">'
            '<label>API key <input type="password" name="key" autocomplete="off" size="60" required></label> '
            "<button>Log in</button></form>")
    return _page("imgq jobs: log in", body)


def cancel_page(job: JobSummary, principal: Any, csrf: str) -> str:
    """The confirmation of a cancel: what it will do, and the form that does it."""
    if job.cancelled_at is not None:
        body = f"<h2>Already cancelled</h2><p>Job <code>{job.id}</code> was cancelled at {_when(job.cancelled_at)}.</p>"
    else:
        running = (f" Its {job.running} running item{'s' * (job.running != 1)} finish{'es' * (job.running == 1)}."
                   if job.running else "")
        body = (f"<h2>Cancel job <code>{job.id}</code>?</h2>"
                f"<p>Its {job.queued} queued item{'s' * (job.queued != 1)} will never run.{running} "
                "Its results and dead letters stay; a cancelled job cannot be resumed or retried.</p>"
                f'<form method="post" action="/ui/jobs/{job.id}/cancel">'
                f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
                f"<button>Cancel {job.queued} queued item{'s' * (job.queued != 1)}</button></form>")
    return _page(f"imgq job {job.id}", body + f'<p><a href="/ui/jobs/{job.id}">Back to the job</a></p>',
                 principal=principal, csrf=csrf)


def message_page(title: str, text: str) -> str:
    return _page(title, f"<h2>{escape(title)}</h2><p>{escape(text)}</p><p><a href=\"/ui\">Jobs</a></p>")


def confirm_login_page(token: str, next_path: str, tenant: str) -> str:
    """A login link opened from elsewhere (a mail, a chat, another site): the link is spent only by
    this page's button, a same-site POST. So another site cannot log a browser into its own tenant
    unseen, and a mail scanner that fetches the link does not use it up."""
    body = (f"<h2>Open the jobs page</h2><p>This link logs this browser in as tenant "
            f"<b>{escape(tenant)}</b> for 8 hours.</p>"
            '<form method="post" action="/ui/login/link">'
            f'<input type="hidden" name="token" value="{escape(token)}">'
            f'<input type="hidden" name="next" value="{escape(next_path)}">'
            "<button>Continue</button></form>")
    return _page("imgq jobs: log in", body)


def login_path(next_path: str) -> str:
    return "/ui/login?next=" + quote(next_path, safe="/")

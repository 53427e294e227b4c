"""A read-only web page that draws the mesh live, as ``flexmesh status`` does in a terminal.

    GET /ui          the page: HTML and vanilla JavaScript, no external assets
    GET /ui/state    what the page polls every second: this agent's status, the nodes and
                     devices it sees, and its jobs counted by state (never their commands)

Both are served on the agent's Unix socket (``make_app`` registers ``page`` and
``state``) and, when asked, on a TCP port of their own (``start_ui``, 127.0.0.1 by
default). On TCP the page answers only requests whose ``Host`` names the address it was
bound to or ``localhost``, so a web site that rebinds its DNS name to 127.0.0.1 cannot
read the mesh through the visitor's browser. The page draws with ``textContent`` only:
node names arrive by gossip and are never parsed as HTML. Its inline script and style are
allowed by hash in a Content-Security-Policy that forbids everything else.
"""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from yarl import URL

from flexmesh.agent.devices.vnpu import VNPU
from flexmesh.agent.models import PLACED, QUEUED, RUNNING
from flexmesh.agent.netaddr import is_loopback_host

if TYPE_CHECKING:  # imported by api; the key is looked up when a request comes
    from flexmesh.agent.runtime import Agent

POLL_MS = 1000

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
#summary { color: #555; margin-bottom: .6em; }
#error { color: #fff; background: #b00020; padding: .3em .6em; display: none; }
.legend span { display: inline-block; width: .9em; height: .9em; margin: 0 .3em 0 1em;
  vertical-align: middle; }
.node { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em;
  margin: .8em 0; }
.node h2 { font-size: 1.1em; margin: 0 0 .4em; }
.state { font-size: .8em; padding: .1em .5em; border-radius: 1em; margin-left: .6em;
  color: #fff; background: #888; }
.state.alive { background: #2e7d32; } .state.suspect { background: #f9a825; }
.state.dead { background: #b00020; } .state.left { background: #999; }
.coord { font-size: .8em; margin-left: .6em; color: #6a1b9a; font-weight: bold; }
.addr { font-size: .8em; color: #777; margin-left: .6em; }
.battery { font-size: .8em; margin-left: .6em; color: #2e7d32; }
.battery.low { color: #b00020; }
.device { margin: .4em 0 .6em 1em; }
.device .title { font-family: ui-monospace, monospace; }
.device.unhealthy .title { color: #b00020; }
.row { display: flex; align-items: center; gap: .6em; margin: .15em 0; }
.row .label { width: 5em; color: #555; font-size: .9em; }
.row .nums { font-size: .85em; color: #555; white-space: nowrap; }
.bar { display: flex; width: 28em; max-width: 60vw; height: .9em; background: #eee;
  border-radius: 3px; overflow: hidden; }
.leased { background: #8e24aa; } .local { background: #f9a825; }
.lendable { background: #66bb6a; }
.empty { color: #777; margin-left: 1em; font-style: italic; }
.jobs { font-size: .85em; color: #4a148c; margin-left: 5.6em; font-family: ui-monospace,
  monospace; }
#work { display: flex; flex-wrap: wrap; gap: 1em; margin: .8em 0; }
#work section { background: #fff; border: 1px solid #ddd; border-radius: 6px;
  padding: .5em 1em; min-width: 16em; }
#work h2 { font-size: 1em; margin: 0 0 .3em; }
#work li { font-size: .85em; font-family: ui-monospace, monospace; }
#work ul { margin: 0; padding-left: 1.2em; }
"""

_SCRIPT = r"""
"use strict";
const POLL_MS = __POLL_MS__;
// Beside the page, whatever prefix a proxy puts in front of /ui.
const STATE_URL = location.pathname.replace(/\/+$/, "") + "/state";
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}
function num(v) { return (typeof v === "number" && isFinite(v)) ? v : 0; }
function pct(milli) { return (Math.round(milli) / 10) + "%"; }
function mib(m) {
  if (m === 0) return "0";
  return Math.abs(m) < 1024 ? m + "M" : (Math.round(m / 102.4) / 10) + "G";
}
function shares(cap, leased, lendable) {
  leased = Math.max(num(leased), 0); lendable = Math.max(num(lendable), 0);
  return [leased, Math.max(num(cap) - leased - lendable, 0), lendable];
}
function barRow(label, parts, fmt) {
  const row = el("div", "row");
  row.appendChild(el("span", "label", label));
  const bar = el("div", "bar");
  const total = parts[0] + parts[1] + parts[2];
  ["leased", "local", "lendable"].forEach(function (name, i) {
    const seg = el("span", name);
    seg.style.width = (total ? 100 * parts[i] / total : (i === 2 ? 100 : 0)) + "%";
    seg.title = name + " " + fmt(parts[i]);
    bar.appendChild(seg);
  });
  row.appendChild(bar);
  row.appendChild(el("span", "nums", parts.map(fmt).join(" / ")));
  return row;
}
function deviceBox(d) {
  const box = el("div", "device" + (d.healthy === false ? " unhealthy" : ""));
  box.dataset.device = d.node + "/" + d.id;
  let title = d.id + "  " + d.kind + " " + d.model + "  " + mib(num(d.memory_mib));
  if (d.healthy === false) title += "  UNHEALTHY";
  box.appendChild(el("div", "title", title));
  box.appendChild(barRow("compute", shares(d.compute_milli, d.leased_compute_milli,
                                           d.lendable_compute_milli), pct));
  box.appendChild(barRow("memory", shares(d.memory_mib, d.leased_memory_mib,
                                          d.lendable_memory_mib), mib));
  if (Array.isArray(d.jobs) && d.jobs.length) {
    const jobs = el("div", "jobs", "jobs: " + d.jobs.join(", "));
    jobs.dataset.jobs = d.jobs.join(",");
    box.appendChild(jobs);
  }
  return box;
}
function listBox(kind, title, items, line) {
  const box = el("section");
  box.dataset.work = kind;
  box.appendChild(el("h2", "", title + " (" + items.length + ")"));
  const ul = el("ul");
  items.forEach(function (it) {
    const li = el("li", "", line(it));
    if (it.id) li.dataset.job = it.id;
    ul.appendChild(li);
  });
  if (!items.length) box.appendChild(el("div", "empty", "none"));
  else box.appendChild(ul);
  return box;
}
function drawWork(s) {
  const w = s.work || {queued: [], running: [], ended: []};
  const work = el("div");
  work.id = "work";
  work.appendChild(listBox("queued", "Waiting", w.queued, function (j) {
    return j.id + "  " + j.state + (j.reason ? "  " + j.reason : "");
  }));
  work.appendChild(listBox("running", "Running here", w.running, function (j) {
    let line = j.id + "  from " + j.origin + "  on " + j.devices.join(",");
    if (typeof j.used_memory_mib === "number") line += "  uses " + mib(j.used_memory_mib);
    if (typeof j.utilization_pct === "number") line += " " + j.utilization_pct + "%";
    return line;
  }));
  work.appendChild(listBox("ended", "Recently ended", w.ended, function (j) {
    return j.id + "  " + j.state + (j.reason ? "  " + j.reason : "");
  }));
  const dropped = Object.keys(s.dropped || {}).sort().map(function (k) {
    return {id: "", reason: k, n: s.dropped[k]};
  });
  work.appendChild(listBox("dropped", "Dropped packets", dropped, function (d) {
    return d.reason + ": " + d.n;
  }));
  document.getElementById("work").replaceWith(work);
}
function batterySpan(b) {
  const known = typeof b.level === "number";
  let text = "battery " + (known ? b.level + "%" : "?");
  if (b.charging) text += " charging";
  if (b.lending === false) text += " \u00b7 not lending (floor " + b.floor + "%)";
  const span = el("span", "battery" + (b.lending === false ? " low" : ""), text);
  span.dataset.battery = known ? String(b.level) : "?";
  if (b.problem) span.title = b.problem;
  return span;
}
function nodeBox(n, devices) {
  const box = el("section", "node");
  box.dataset.node = n.name;
  const h = el("h2");
  h.appendChild(el("span", "name", n.name));
  h.appendChild(el("span", "state " + n.state, n.state));
  if (n.coordinator) h.appendChild(el("span", "coord", "\u2605 coordinator"));
  if (n.battery) h.appendChild(batterySpan(n.battery));
  if (n.address) h.appendChild(el("span", "addr", n.address));
  box.appendChild(h);
  if (!devices.length && n.state === "alive") box.appendChild(el("div", "empty", "no devices"));
  devices.forEach(function (d) { box.appendChild(deviceBox(d)); });
  return box;
}
function draw(s) {
  document.getElementById("me").textContent = s.status.name;
  const alive = s.nodes.filter(function (n) { return n.state === "alive"; }).length;
  const coord = s.status.coordinator || "none";
  document.getElementById("summary").textContent =
    s.nodes.length + " nodes (" + alive + " alive), " + s.devices.length +
    " devices, coordinator " + coord + " (term " + s.status.term + "), queue " +
    s.status.queue + " \u00b7 updated " + new Date().toLocaleTimeString();
  const byNode = {};
  s.devices.forEach(function (d) { (byNode[d.node] = byNode[d.node] || []).push(d); });
  const mesh = el("div");
  mesh.id = "mesh";
  s.nodes.forEach(function (n) {
    const devs = (byNode[n.name] || []).slice().sort(function (a, b) {
      return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
    });
    mesh.appendChild(nodeBox(n, devs));
  });
  document.getElementById("mesh").replaceWith(mesh);
  drawWork(s);
}
function showError(text) {
  const e = document.getElementById("error");
  e.textContent = text;
  e.style.display = text ? "block" : "none";
}
async function poll() {
  try {
    const resp = await fetch(STATE_URL, {cache: "no-store"});
    if (!resp.ok) throw new Error("the agent answered " + resp.status);
    draw(await resp.json());
    showError("");
  } catch (err) {
    showError("cannot read the mesh: " + err.message);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();
""".replace("__POLL_MS__", str(POLL_MS))

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>flexmesh</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>flexmesh mesh as seen from <span id="me">&hellip;</span></h1>
<div id="summary">loading&hellip;</div>
<div class="legend">
<span class="leased"></span>leased<span class="local"></span>local<span
class="lendable"></span>lendable</div>
<div id="error"></div>
<div id="work"></div>
<div id="mesh"></div>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


CSP = (f"default-src 'none'; script-src '{_sha256(_SCRIPT)}'; "
       f"style-src '{_sha256(_STYLE)}'; connect-src 'self'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"}


def state_view(agent: Agent) -> dict[str, Any]:
    """What ``/ui/state`` returns."""
    node = agent.node
    st = node.views.status()
    rows = node.views.devices()
    for row in rows:
        if row["node"] == st.name and row["enforcement"] != VNPU:  # (vnpu: per device)
            row["enforcement"] = agent.enforcement
    jobs: dict[str, int] = {}
    for (state, role), n in st.jobs.items():
        if role != "owner":
            jobs[state] = jobs.get(state, 0) + n
    return {
        "status": {"name": st.name, "address": agent.addr,
                   "coordinator": st.coordinator, "term": st.term,
                   "is_coordinator": st.is_coordinator, "queue": st.queue,
                   "enforcement": agent.enforcement},
        "nodes": node.views.nodes(), "devices": rows, "jobs": jobs,
        "work": work_view(agent), "dropped": {
            k.removeprefix("packets_dropped_").removeprefix("frames_dropped_") + (
                " (tcp)" if k.startswith("frames") else ""): n
            for k, n in {**st.counters, **agent.counters}.items()
            if k.startswith(("packets_dropped_", "frames_dropped_")) and n},
    }


def work_view(agent: Agent, shown: int = 20) -> dict[str, list[dict[str, Any]]]:
    """The work, not only the capacity: jobs submitted here still waiting, jobs running
    on this node's devices, and the latest that ended, with their reasons (never their
    commands or environments: the page may be open to every local user)."""
    node = agent.node
    mine = sorted(node.origin.jobs.values(), key=lambda j: j.created_at)
    queued = [{"id": j.id, "state": j.state, "reason": j.reason[:120]}
              for j in mine if j.state in (QUEUED, PLACED)][:shown]
    use = getattr(getattr(agent, "sampler", None), "job_use", {})
    running = [{"id": j.id, "origin": j.origin, "devices": j.devices,
                "used_memory_mib": getattr(use.get(j.id), "memory_mib", None),
                "utilization_pct": getattr(use.get(j.id), "utilization_pct", None)}
               for j in sorted(node.owner.runs.values(), key=lambda j: j.created_at)
               if j.state == RUNNING][:shown]
    ended = sorted((j for j in mine if j.terminal), key=lambda j: j.updated_at,
                   reverse=True)[:shown // 2]
    return {"queued": queued, "running": running,
            "ended": [{"id": j.id, "state": j.state, "reason": j.reason[:120]}
                      for j in ended]}


async def page(request: web.Request) -> web.Response:
    """``GET /ui``: the page (its script polls ``state`` beside it)."""
    return web.Response(text=PAGE, content_type="text/html", charset="utf-8",
                        headers={**_HEADERS, "Content-Security-Policy": CSP})


async def state(request: web.Request) -> web.Response:
    """``GET /ui/state``."""
    from flexmesh.agent.api import AGENT_KEY

    return web.json_response(state_view(request.app[AGENT_KEY]), headers=_HEADERS)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ui", page)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/state", state)


def host_guard(bound_host: str) -> Middleware:
    """Middleware: on a loopback bind, refuse a ``Host`` that is not a loopback name."""
    allowed = {"localhost", bound_host.strip("[]").lower()}
    open_to_all = not is_loopback_host(bound_host)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = _host_name(request.host)
        if open_to_all or host in allowed or is_loopback_host(host):
            return await handler(request)
        return web.Response(status=403, text=f"host {host!r} is not allowed here\n")
    return guard


def _host_name(header: str) -> str:
    try:
        return (URL(f"http://{header}").host or "").lower()
    except ValueError:
        return ""


async def _root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui")


async def start_ui(agent: Agent, host: str = "127.0.0.1",
                   port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve the page on TCP; returns the runner (``cleanup()`` it) and the page's URL."""
    from flexmesh.agent.api import AGENT_KEY

    app = web.Application(middlewares=[host_guard(host)])
    app[AGENT_KEY] = agent
    app.router.add_get("/", _root)
    add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    addr = runner.addresses[0]
    bound, bound_port = str(addr[0]), int(addr[1])
    netloc = f"[{bound}]:{bound_port}" if ":" in bound else f"{bound}:{bound_port}"
    return runner, f"http://{netloc}/ui"

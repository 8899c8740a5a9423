// The worklist: live SLA countdowns, refresh without reload, one-click claim/release.
// Refreshes send X-Background: 1 so an unattended page is still logged off when idle.
(function () {
  "use strict";
  const table = document.getElementById("worklist");
  if (!table) return;
  const tbody = table.querySelector("tbody");
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const pollMs = Number(table.dataset.pollMs) || 5000;
  let offset = Number(table.dataset.now) - Date.now() / 1000; // server clock - ours
  let rows = null; // last items from the server, or null while showing the server's HTML
  const updated = document.getElementById("updated");

  function serverNow() { return Date.now() / 1000 + offset; }

  function clock(seconds) {
    const s = Math.floor(Math.abs(seconds));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(r).padStart(2, "0");
    return (h ? h + ":" : "") + mm + ":" + ss;
  }

  function slaClass(due, slaMinutes, breached) {
    const left = due - serverNow();
    if (breached || left <= 0) return "breached";
    return left < (slaMinutes * 60) / 2 ? "amber" : "green";
  }

  function tick() {
    for (const tr of tbody.querySelectorAll("tr[data-due]")) {
      const due = Number(tr.dataset.due), left = due - serverNow();
      const cls = slaClass(due, Number(tr.dataset.sla), tr.dataset.breached === "true");
      tr.classList.remove("green", "amber", "breached");
      tr.classList.add(cls);
      tr.querySelector("td.sla").textContent = left > 0 ? clock(left) : "breached " + clock(left);
    }
  }

  function cell(tr, text, small) {
    const td = document.createElement("td");
    td.textContent = text;
    if (small !== undefined) {
      td.appendChild(document.createElement("br"));
      const s = document.createElement("span");
      s.className = "small";
      s.textContent = small;
      td.appendChild(s);
    }
    tr.appendChild(td);
    return td;
  }

  function badge(text, cls) {
    const b = document.createElement("span");
    b.className = "badge " + cls;
    b.textContent = text;
    return b;
  }

  function render(items) {
    const fresh = document.createDocumentFragment();
    for (const it of items) {
      const tr = document.createElement("tr");
      tr.dataset.id = it.id; tr.dataset.due = it.due_at; tr.dataset.sla = it.sla_minutes;
      tr.dataset.breached = String(it.breached); tr.dataset.testid = "item";
      tr.setAttribute("data-testid", "item");
      const sla = cell(tr, "…"); sla.className = "sla"; sla.setAttribute("data-testid", "countdown");
      cell(tr, "").appendChild(badge(it.priority, it.priority));
      cell(tr, it.patient_name, it.patient_id);
      cell(tr, it.description, it.accession);
      cell(tr, it.modalities.join(", "));
      cell(tr, it.body_part);
      cell(tr, it.site);
      const imgs = cell(tr, String(it.images));
      if (it.arriving) {
        imgs.append(" ");
        const b = imgs.appendChild(badge("images arriving", "arriving"));
        b.setAttribute("data-testid", "arriving");
        b.title = "the study is still arriving: more images may come";
      }
      if (it.late) { imgs.append(" "); imgs.appendChild(badge("late images", "late")); }
      cell(tr, it.state + (it.claimed_by ? " · " + (it.mine ? "you" : it.claimed_by) : ""));
      const act = cell(tr, "");
      if (it.mine && it.state === "claimed") act.appendChild(button("release", "Release"));
      else if (it.state === "queued" && it.eligible && !it.hold) act.appendChild(button("claim", "Claim"));
      const a = document.createElement("a");
      a.href = it.open_url; a.textContent = it.eligible ? "Open" : "Open (break-glass)";
      act.appendChild(a);
      if (it.mine && (it.state === "claimed" || it.state === "preliminary")) {
        // The reader holding the study writes the report beside the images.
        const r = document.createElement("a");
        r.href = "/reports/item/" + it.id; r.textContent = "Report"; r.className = "report-link";
        act.append(" "); act.appendChild(r);
      }
      fresh.appendChild(tr);
    }
    if (!items.length) {
      const tr = document.createElement("tr"); tr.className = "empty";
      const td = cell(tr, "Nothing to read."); td.colSpan = 10; td.className = "muted";
      fresh.appendChild(tr);
    }
    tbody.replaceChildren(fresh);
    tick();
  }

  function button(action, label) {
    const b = document.createElement("button");
    b.dataset.action = action; b.textContent = label;
    if (action === "release") b.className = "secondary";
    return b;
  }

  let etag = null; // the tag of the rows shown: an unchanged refresh answers 304, no body

  async function refresh() {
    try {
      const headers = { "Accept": "application/json", "X-Background": "1" };
      if (etag && rows) headers["If-None-Match"] = etag;
      // no-store: the answer names patients; the rows stay in this page's memory only.
      const resp = await fetch("/worklist/items" + window.location.search, {
        headers: headers, credentials: "same-origin", cache: "no-store",
      });
      if (resp.status === 401) { window.location.href = "/login?idle=1&next=" + encodeURIComponent(location.pathname + location.search); return; }
      if (resp.status === 304) { updated.textContent = "updated " + new Date().toLocaleTimeString(); return; }
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      etag = resp.headers.get("ETag");
      const data = await resp.json();
      offset = data.now - Date.now() / 1000;
      rows = data.items;
      render(rows);
      updated.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      updated.textContent = "cannot reach the appliance (" + e.message + "); retrying";
    }
  }

  tbody.addEventListener("click", async (ev) => {
    const b = ev.target.closest("button[data-action]");
    if (!b) return;
    const id = b.closest("tr").dataset.id;
    b.disabled = true;
    const resp = await fetch(`/worklist/${id}/${b.dataset.action}`, {
      method: "POST", credentials: "same-origin",
      headers: { "Accept": "application/json", "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: "{}",
    });
    if (!resp.ok) {
      let msg = "HTTP " + resp.status;
      try { msg = (await resp.json()).error || msg; } catch (e) { /* not JSON */ }
      updated.textContent = msg;
    }
    await refresh();
  });

  tick();
  setInterval(tick, 1000);
  setInterval(refresh, pollMs);
})();

// The turnaround dashboard refreshes its figures in the background (not counted as activity).
(function () {
  "use strict";
  const stats = document.getElementById("stats");
  if (!stats) return;
  const min = (v) => (v === null || v === undefined ? "–" : Math.round(v) + " min");
  function set(k, text) { const el = stats.querySelector(`[data-k="${k}"]`); if (el) el.textContent = text; }
  async function refresh() {
    const resp = await fetch("/dashboard/data", { headers: { "Accept": "application/json", "X-Background": "1" } });
    if (resp.status === 401) { window.location.href = "/login?idle=1&next=/dashboard"; return; }
    if (!resp.ok) return;
    const d = await resp.json();
    set("read", String(d.read)); set("p50", min(d.p50_minutes)); set("p90", min(d.p90_minutes));
    set("share", d.within_sla_share === null ? "–" : Math.round(d.within_sla_share * 100) + "%");
    set("breaches", String(d.breached_in_window)); set("waiting", String((d.open || {}).queued || 0));
  }
  setInterval(refresh, Number(stats.dataset.pollMs) || 10000);
})();

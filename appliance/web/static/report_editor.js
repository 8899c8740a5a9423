// The report editor: autosave as JSON (with the CSRF header) while the reader types,
// a conflict message instead of a silent overwrite, and sign = save, then sign that revision.
(function () {
  "use strict";
  const form = document.getElementById("report-editor");
  if (!form) return;
  const id = form.dataset.report;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const stateEl = document.getElementById("save-state");
  let revision = Number(form.dataset.revision);
  let dirty = false, saving = null, timer = null, blocked = false;

  function values() {
    const fields = {};
    for (const div of form.querySelectorAll(".field")) {
      const key = div.dataset.key, type = div.dataset.type;
      if (type === "aspects") {
        if (div.querySelector('[name="aspects-assessed"]').checked) {
          fields[key] = Array.from(div.querySelectorAll('[name="region"]:checked')).map((c) => c.value);
        }
        continue;
      }
      const input = div.querySelector("[name='f-" + key + "']");
      if (type === "boolean") { if (input.checked) fields[key] = true; continue; }
      if (input.value !== "") fields[key] = type === "number" ? Number(input.value) : input.value;
    }
    const body = { revision: revision, fields: fields, findings: form.elements.findings.value };
    if (form.elements.impression) body.impression = form.elements.impression.value;
    if (form.elements.template_id) body.template_id = form.elements.template_id.value;
    return body;
  }

  function show(text, cls) { stateEl.textContent = text; stateEl.className = cls || "muted"; }

  async function post(path, body) {
    const r = await fetch(path, {
      method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrf },
    });
    let data = {};
    try { data = await r.json(); } catch (e) { /* an HTML error page */ }
    return { ok: r.ok, status: r.status, data: data };
  }

  async function save() {
    if (saving) await saving;
    if (!dirty || blocked) return true;
    dirty = false;
    show("saving…");
    saving = post("/reports/" + id + "/autosave", values()).then((res) => {
      if (res.ok) { revision = res.data.revision; show("saved (revision " + revision + ")"); return true; }
      if (res.status === 409) blocked = true;
      dirty = true;
      show("not saved: " + (res.data.error || "error " + res.status), "error");
      return false;
    }).catch(() => { dirty = true; show("not saved: no connection; retrying", "error"); return false; });
    const ok = await saving;
    saving = null;
    return ok;
  }

  function changed() {
    dirty = true;
    show("unsaved changes");
    clearTimeout(timer);
    timer = setTimeout(save, 1200);
  }

  form.addEventListener("submit", function (ev) { ev.preventDefault(); save(); });  // Enter key
  form.addEventListener("input", changed);
  form.addEventListener("change", function (ev) {
    if (ev.target.name === "template_id") {  // a new template: save, then show its fields
      dirty = true;
      clearTimeout(timer);
      save().then((ok) => { if (ok) window.location.reload(); });
      return;
    }
    const box = ev.target.closest("fieldset.aspects");
    if (box) {
      const assessed = box.querySelector('[name="aspects-assessed"]');
      if (ev.target.name === "region" && ev.target.checked) assessed.checked = true;
      const n = box.querySelectorAll('[name="region"]:checked').length;
      box.querySelector("output").textContent = assessed.checked ? String(10 - n) : "–";
    }
    changed();
  });
  setInterval(function () { if (dirty) save(); }, 10000);
  window.addEventListener("beforeunload", function (ev) { if (dirty) { save(); ev.preventDefault(); } });
  // Another form on the page (flag a critical finding): save the text first, then submit.
  document.addEventListener("submit", function (ev) {
    if (!dirty || ev.target === form) return;
    ev.preventDefault();
    const other = ev.target;
    save().then((ok) => { if (ok) other.submit(); });
  });

  for (const button of form.querySelectorAll("[data-sign]")) {
    button.addEventListener("click", async function () {
      if (!(await save())) return;
      show("signing…");
      const res = await post("/reports/" + id + "/sign", { level: button.dataset.sign, revision: revision });
      if (res.ok) { window.location.reload(); return; }
      show("not signed: " + (res.data.error || "error " + res.status), "error");
    });
  }
})();

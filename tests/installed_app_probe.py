"""Run by tests/test_installed_wheel.py with an installed appliance's Python, from a temp dir.

Makes a site with the installed ``appliance init``, signs in, opens every GET page the URL map
has (filling in a consult and an invite), renders each template no page reached with a
permissive context, fetches every static file a template names, and prints what it saw
as JSON. It asserts nothing itself: the test does, so a failure shows the whole picture.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

BASE = "https://localhost"
HTML = {"Accept": "text/html"}
# Pages that wait for news (long polls) are not opened: they hold the request open.
WAITING_ENDPOINTS = {"consults.events"}


class Anything:
    """Stands in for every variable of a template rendered without its view: any attribute,
    item, call or arithmetic gives another Anything; it iterates as empty and prints empty."""

    def __getattr__(self, _name: str) -> Anything:
        return self

    def __getitem__(self, _key: Any) -> Anything:
        return self

    def __call__(self, *_a: Any, **_k: Any) -> Anything:
        return self

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return ""

    def __html__(self) -> str:
        return ""

    def __format__(self, _spec: str) -> str:
        return ""

    def _same(self, *_a: Any) -> Anything:
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _same
    __truediv__ = __rtruediv__ = __floordiv__ = __mod__ = __rmod__ = __neg__ = _same

    def __lt__(self, _o: Any) -> bool:
        return False

    __le__ = __gt__ = __ge__ = __lt__

    def __int__(self) -> int:
        return 0

    def __float__(self) -> float:
        return 0.0


def make_site(data_dir: Path) -> dict[str, Any]:
    from appliance.accounts import users
    from appliance.cli import main
    from appliance.consults import rooms
    from appliance.core import config, db

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["init", "--data-dir", str(data_dir), "--site-name", "Wheel site"]) == 0
    cfg = config.load(data_dir)
    conn = db.connect(cfg.db_path)
    try:
        users.add_user(conn, "probe", "admin", "probe-password-1")
        consult = rooms.create_consult(conn, "probe", title="Installed wheel probe")
        key = rooms.load_key(cfg.keys_dir, rooms.INVITE_KEY_FILE)
        token = rooms.make_invite(conn, key, consult, "probe", ttl_s=3600)
    finally:
        conn.close()
    return {"cfg": cfg, "cid": consult, "token": token}


def sign_in(client) -> int:
    form = client.get("/login", base_url=BASE, headers=HTML).get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    return client.post("/login", base_url=BASE, headers=HTML, data={
        "username": "probe", "password": "probe-password-1", "csrf_token": csrf}).status_code


def open_pages(app, client, values: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
    pages, skipped = {}, []
    with app.test_request_context(base_url=BASE):
        from flask import url_for

        for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
            if "GET" not in rule.methods or rule.endpoint == "static" \
                    or rule.endpoint in WAITING_ENDPOINTS:
                continue
            if not set(rule.arguments) <= set(values):
                skipped.append(rule.rule)
                continue
            url = url_for(rule.endpoint, **{a: values[a] for a in rule.arguments})
            pages[url] = None
    for url in pages:
        pages[url] = client.get(url, base_url=BASE, headers=HTML).status_code
    return pages, skipped


def render_the_rest(app, reached: set[str]) -> dict[str, str]:
    """Templates no page rendered: rendered with Anything for each variable they use."""
    from flask import render_template
    from jinja2 import meta

    out = {}
    with app.test_request_context("/", base_url=BASE):
        for name in app.jinja_env.list_templates():
            if name in reached or not name.endswith(".html"):
                continue
            source = app.jinja_env.loader.get_source(app.jinja_env, name)[0]
            names = meta.find_undeclared_variables(app.jinja_env.parse(source))
            try:
                render_template(name, **{n: Anything() for n in names
                                         if n not in app.jinja_env.globals})
                out[name] = "ok"
            except Exception as e:  # reported, not raised: the test names the template
                out[name] = f"{type(e).__name__}: {e}"
    return out


def static_files(app, client) -> dict[str, int]:
    """Every static file a template names, fetched through the app."""
    wanted = set()
    for name in app.jinja_env.list_templates():
        source = app.jinja_env.loader.get_source(app.jinja_env, name)[0]
        wanted |= set(re.findall(r"url_for\(\s*['\"]static['\"]\s*,\s*filename\s*=\s*['\"]([^'\"]+)",
                                 source))
    return {f: client.get(f"/static/{f}", base_url=BASE).status_code for f in sorted(wanted)}


def main(data_dir: Path) -> dict[str, Any]:
    from flask import template_rendered

    import appliance
    from appliance.app import create_app

    site = make_site(data_dir)
    app = create_app(site["cfg"])
    rendered: list[str] = []
    template_rendered.connect(lambda _s, template, **_k: rendered.append(template.name), app,
                              weak=False)
    client = app.test_client()
    signed_in = sign_in(client)
    pages, skipped = open_pages(app, client, {"cid": site["cid"], "token": site["token"]})
    rest = render_the_rest(app, set(rendered))
    return {
        "module": appliance.__file__,
        "template_folder": str(Path(app.root_path) / app.template_folder),
        "static_folder": app.static_folder,
        "templates": sorted(app.jinja_env.list_templates()),
        "signed_in": signed_in,
        "pages": pages,
        "skipped": skipped,
        "rendered_by_pages": sorted(set(rendered)),
        "rendered_alone": rest,
        "static": static_files(app, client),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))

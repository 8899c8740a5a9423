"""A consult guest's browser driven from another process (run inside a network namespace).

The fault tests put one side of a consult in a network namespace so that iptables and tc can
break its network without touching anyone else's. Playwright cannot reach a browser across
namespaces, so this process runs there (``ip netns exec NS python consult_guest_process.py``),
drives its own Chromium and takes one JSON command per line on stdin, answering one JSON line
on stdout: {"cmd": "goto"|"click"|"fill"|"eval"|"wait"|"quit", ...}.
"""

from __future__ import annotations

import json
import sys

from playwright.sync_api import sync_playwright

ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        "--allow-loopback-in-peer-connection", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--autoplay-policy=no-user-gesture-required"]


def serve(page) -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            kind, value = cmd["cmd"], None
            if kind == "quit":
                return
            if kind == "goto":
                page.goto(cmd["url"])
            elif kind == "click":
                page.click(cmd["sel"], timeout=cmd.get("timeout", 15000))
            elif kind == "fill":
                page.fill(cmd["sel"], cmd["value"])
            elif kind == "eval":
                value = page.evaluate(cmd["js"])
            elif kind == "wait":
                page.wait_for_function(cmd["js"], timeout=cmd.get("timeout", 15000))
            answer = {"ok": True, "value": value}
        except Exception as e:  # report to the test, keep serving
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def main() -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=sys.argv[1], headless=True, args=ARGS)
        try:
            serve(browser.new_context(ignore_https_errors=True).new_page())
        finally:
            browser.close()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Checks /docs in a real headless Chromium against the real binary (scripts/docs-check runs it).

    docs-browser.py BINARY OPENAPI_JSON SCREENSHOT

Starts BINARY (`serve`, SQLite in a temporary data directory, a random admin key, port 0), then
drives Debian's chromium through /usr/bin/chromedriver (selenium):

- the page renders offline: every host but 127.0.0.1 fails to resolve in the browser, and every
  resource the page loaded came from the server itself (Swagger UI is vendored in the binary);
- it lists every operation of OPENAPI_JSON (method and path), and nothing else;
- "Authorize" with the admin key, then "Try it out" on PUT tokens with the preselected example
  answers 201, and "Try it out" on GET tokens for the same user answers 200 with that bundle.

Saves a screenshot to SCREENSHOT and prints a one-line description of what the browser showed.
"""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

USER = "docs-check"


def start_server(binary, data_dir, admin_key):
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CENTRALDB_DATA_DIR": data_dir,
        "CENTRALDB_LISTEN": "127.0.0.1:0",
        "CENTRALDB_LOG_FORMAT": "json",
        "RUST_LOG": "info",
        "CENTRALDB_BOOTSTRAP_ADMIN_KEY": admin_key,
    }
    proc = subprocess.Popen(
        [binary, "serve"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    addr, log, ready = [], [], threading.Event()

    def pump():
        for line in proc.stdout:
            log.append(line)
            try:
                fields = json.loads(line).get("fields", {})
            except (ValueError, AttributeError):
                continue
            if fields.get("message") == "centraldb-mfa listening":
                addr.append(fields["addr"])
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(60):
        proc.kill()
        raise SystemExit("docs-check: the server did not start:\n" + "".join(log[-30:]))
    return proc, f"http://{addr[0]}"


def browser(profile_dir):
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile_dir}",
        "--window-size=1400,2200",
        # offline: no host but the server's resolves
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def try_it_out(driver, wait, op_id, body=None):
    """Expands operation `op_id`, fills user_id (and keeps the prefilled body), executes it and
    returns (status, response body text)."""
    block = wait.until(EC.presence_of_element_located((By.ID, op_id)))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", block)
    if "is-open" not in block.get_attribute("class"):
        block.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
    wait.until(lambda d: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    user = wait.until(lambda d: block.find_element(By.CSS_SELECTOR, 'tr[data-param-name="user_id"] input'))
    user.clear()
    user.send_keys(USER)
    if body is not None:
        prefilled = block.find_element(By.CSS_SELECTOR, "textarea.body-param__text").get_attribute("value")
        body.append(prefilled)
    block.find_element(By.CSS_SELECTOR, "button.execute").click()
    status = wait.until(
        lambda d: block.find_element(By.CSS_SELECTOR, ".live-responses-table .response .response-col_status").text.strip()
        or False
    )
    # the first code block of the live response is its body (the headers follow)
    text = block.find_element(By.CSS_SELECTOR, ".live-responses-table .response-col_description pre").get_attribute(
        "textContent"
    )
    return status.split()[0], text


def main(binary, spec_path, screenshot):
    doc = json.load(open(spec_path, encoding="utf-8"))
    expected = {
        (m.upper(), p) for p, item in doc["paths"].items() for m in item if m in ("get", "put", "post", "delete", "patch")
    }
    admin_key = "cdbm_docs_" + secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="cdb-docs-") as data, tempfile.TemporaryDirectory(
        prefix="cdb-chromium-"
    ) as profile:
        proc, base = start_server(binary, data, admin_key)
        driver = None
        try:
            driver = browser(profile)
            wait = WebDriverWait(driver, 60)
            driver.get(f"{base}/docs/")
            title = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, ".information-container .title")))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= len(expected))
            listed = set()
            for block in driver.find_elements(By.CSS_SELECTOR, ".opblock"):
                method = block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text.strip().upper()
                path = block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path")
                listed.add((method, path))
            tags = len(driver.find_elements(By.CSS_SELECTOR, ".opblock-tag-section"))
            problems = []
            if listed != expected:
                problems.append(f"operations missing: {sorted(expected - listed)}; extra: {sorted(listed - expected)}")

            # Authorize with the admin key.
            driver.find_element(By.CSS_SELECTOR, ".auth-wrapper .authorize").click()
            field = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, ".modal-ux-content input")))
            field.send_keys(admin_key)
            driver.find_element(By.CSS_SELECTOR, ".modal-ux-content .auth-btn-wrapper .authorize").click()
            wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, ".modal-ux-content .btn-done"))).click()

            sent = []
            put_status, put_body = try_it_out(driver, wait, "operations-tokens-put_tokens", body=sent)
            get_status, get_body = try_it_out(driver, wait, "operations-tokens-get_tokens")
            if put_status != "201":
                problems.append(f"PUT tokens with the example answered {put_status}: {put_body[:300]}")
            if get_status != "200":
                problems.append(f"GET tokens answered {get_status}: {get_body[:300]}")
            kind = json.loads(sent[0]).get("kind") if sent and sent[0].strip().startswith("{") else "?"
            if get_status == "200" and '"status": "valid"' not in get_body:
                problems.append(f"GET tokens did not return a valid bundle: {get_body[:300]}")

            resources = driver.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])"
            )
            foreign = sorted({r for r in resources if not r.startswith(base + "/")})
            if foreign:
                problems.append(f"the page loaded resources from elsewhere: {foreign}")

            # The key is throwaway (its server and data directory go away), but a screenshot is
            # an artefact: blank it out of the page's curl snippets first.
            driver.execute_script(
                """const key = arguments[0];
                const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
                for (let n = walk.nextNode(); n; n = walk.nextNode()) {
                  if (n.nodeValue.includes(key)) n.nodeValue = n.nodeValue.split(key).join('cdbm_(redacted)');
                }""",
                admin_key,
            )
            driver.execute_script("window.scrollTo(0, 0)")
            os.makedirs(os.path.dirname(screenshot) or ".", exist_ok=True)
            driver.save_screenshot(screenshot)
            size = driver.get_window_size()
            for p in problems:
                print(f"docs-check: FAILED: {p}")
            print(
                f"docs-check: /docs rendered offline in headless Chromium {driver.capabilities.get('browserVersion', '?')}"
                f" (vendored Swagger UI, {len(resources)} resources, all from {base}): title "
                f"{title.text.split(chr(10))[0]!r}, {len(listed & expected)}/{len(expected)} operations in {tags} tags; "
                f"Authorize with an admin key, Try it out: PUT tokens (preselected {kind} example) {put_status}, "
                f"GET tokens {get_status}; screenshot {screenshot} ({size['width']}x{size['height']})"
            )
            return 1 if problems else 0
        finally:
            if driver is not None:
                driver.quit()
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    started = time.monotonic()
    rc = main(*sys.argv[1:])
    print(f"docs-check: browser check took {time.monotonic() - started:.1f} s")
    sys.exit(rc)

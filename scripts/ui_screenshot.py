"""A headless-Chromium screenshot of the Prefect UI's page for a finished iterative-dpo flow run.

    python scripts/ui_screenshot.py --out docs/images/ui-flow-run.png

Starts `prefect server start` (UI on) on a free loopback port with a temporary PREFECT_HOME, runs
`python -m flows.iterative_dpo --config CONFIG --iterations 1` against it, then opens the flow run's page in
Debian's `chromium` (`apt-get install chromium`). With --api-url and --flow-run-id it photographs a run on a
server that is already up instead.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(api: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError("prefect server exited")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{api} not healthy after {timeout}s")


def latest_flow_run(api: str) -> dict:
    runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}, timeout=30)
    runs.raise_for_status()
    if not runs.json():
        raise RuntimeError("no flow run on the server")
    return runs.json()[0]


def screenshot(chromium: str, url: str, out: Path, width: int, height: int, budget_ms: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
             f"--virtual-time-budget={budget_ms}", url],
            check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not out.exists():
        raise RuntimeError(f"chromium wrote no {out}")


def run_page(base: str, flow_run_id: str) -> str:
    settings = httpx.get(f"{base}/ui-settings", timeout=10).json()
    root = settings["v2_base_url"] if settings["default_ui"] == "v2" else settings["v1_base_url"]
    return f"{base}{root.rstrip('/')}/runs/flow-run/{flow_run_id}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "ui-flow-run.png")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--api-url", help="an existing server's API (with --flow-run-id): start nothing")
    parser.add_argument("--flow-run-id")
    parser.add_argument("--window-size", default="1400,1000")
    parser.add_argument("--virtual-time-budget", type=int, default=15000, help="ms of page time before the shot")
    args = parser.parse_args()
    if not args.chromium:
        sys.exit("chromium not found: apt-get install chromium")
    width, height = (int(v) for v in args.window_size.split(","))

    if args.api_url:
        if not args.flow_run_id:
            sys.exit("--api-url needs --flow-run-id")
        base = args.api_url.rstrip("/").removesuffix("/api")
        url = run_page(base, args.flow_run_id)
        screenshot(args.chromium, url, args.out, width, height, args.virtual_time_budget)
        print(f"{url} -> {args.out}")
        return

    with tempfile.TemporaryDirectory(prefix="ui-screenshot-") as tmp:
        port = free_port()
        base, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_HOME": f"{tmp}/prefect-home", "PREFECT_API_URL": api,
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(f"{tmp}/server.log", "w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                 "--analytics-off"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_healthy(api, server)
                print(f"server up at {base}; running {args.config} (1 iteration)", flush=True)
                subprocess.run([sys.executable, "-m", "flows.iterative_dpo", "--config", args.config, "--iterations",
                                "1", "--store-root", f"{tmp}/store"], cwd=REPO, env=env, check=True)
                flow_run = latest_flow_run(api)
                print(f"flow run {flow_run['name']} ({flow_run['id']}): {flow_run['state_type']}", flush=True)
                url = run_page(base, flow_run["id"])
                screenshot(args.chromium, url, args.out, width, height, args.virtual_time_budget)
                print(f"{url} -> {args.out}")
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)


if __name__ == "__main__":
    main()

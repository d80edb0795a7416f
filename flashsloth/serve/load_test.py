"""
The load test of `flashsloth serve` (`flashsloth serve-bench`, or `python -m flashsloth.serve.load_test`).

Distinct synthetic scenes and questions are sent one at a time first: those answers are the reference. Then concurrent
clients send the same requests (every other one streamed), to the batching server and to one with batching off
(`--max-batch-size 1`); every answer must equal its one-at-a-time answer. Reports p50/p99 latency, throughput, how
requests were batched and the server's peak memory: a table on stdout, a markdown table, JSON and a PNG chart.

Only the standard library talks to the server, and it only ever talks to 127.0.0.1 (or the --url you give).
"""

import argparse
import base64
import http.client
import io
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path


SERVER_START_TIMEOUT = 180
REQUEST_TIMEOUT = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..demo import DEMO_MODEL_DIR

    parser.add_argument("--model", default=str(DEMO_MODEL_DIR), help="Model to serve (default: the demo model).")
    parser.add_argument("--url", help="Test a server already running at this URL instead of starting one.")
    parser.add_argument("--clients", type=int, default=32, help="Concurrent clients (default: %(default)s).")
    parser.add_argument("--requests-per-client", type=int, default=4, help="Requests each (default: %(default)s).")
    parser.add_argument(
        "--max-tokens", type=int, default=48, help="max_tokens of every request (default: %(default)s)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scenes and questions (default: %(default)s).")
    parser.add_argument(
        "--output",
        default="docs/serving_load",
        help="Prefix of the .md, .json and .png written (default: %(default)s); '' writes nothing.",
    )
    parser.add_argument(
        "--no-unbatched", action="store_true", help="Skip the concurrent run against a server with batching off."
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="An extra argument for the started servers, e.g. --server-arg=--device=cuda (repeatable).",
    )
    parser.add_argument(
        "--continuous-batching-check",
        type=int,
        metavar="N",
        default=0,
        help="Instead of the load test: answer N questions with transformers' continuous batching "
        "(model.generate_batch) and with generate, and count how many agree.",
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def build_requests(count: int, seed: int, max_tokens: int) -> list[dict]:
    """`count` chat requests, each about its own freshly drawn scene (a PNG data URL); one in four asks a caption."""
    from ..training import synthetic

    rng = random.Random(f"flashsloth-serve-load-{seed}")
    requests = []
    for index in range(count):
        scene, record = synthetic.make_sample(index, 2, rng)
        image = synthetic.render_scene(scene, 144 + 8 * rng.randrange(19), rng)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        if index % 4 == 3:
            question = rng.choice(synthetic.CAPTION_PROMPTS)
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        requests.append({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
    return requests


def start_server(model: str, extra_args: list[str] = (), env: dict | None = None):
    """Start `flashsloth serve --port 0` on 127.0.0.1; returns the process and its URL once it listens."""
    command = [sys.executable, "-m", "flashsloth.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", "0"]
    process = subprocess.Popen(
        command + list(extra_args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    found, lines = [], []

    def watch():
        for line in process.stdout:
            lines.append(line)
            if not found and line.startswith("flashsloth serve:") and " at http://" in line:
                found.append(line.split(" at ", 1)[1].split("/ ", 1)[0])

    threading.Thread(target=watch, daemon=True).start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not found and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not found:
        process.kill()
        raise RuntimeError("flashsloth serve did not start:\n" + "".join(lines[-40:]))
    process.output_lines = lines
    return process, found[0]


def stop_server(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def call(url: str, method: str, path: str, body: dict | None = None):
    """One HTTP request; returns (status, parsed JSON or, for an event stream, the list of parsed events)."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=REQUEST_TIMEOUT)
    try:
        payload = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.getheader("Content-Type", "").startswith("text/event-stream"):
            events = []
            for line in response:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[len("data: ") :]))
            return response.status, events
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def ask(url: str, request: dict, stream: bool) -> dict:
    started = time.perf_counter()
    status, body = call(url, "POST", "/v1/chat/completions", {**request, "stream": stream})
    latency = time.perf_counter() - started
    if status != 200:
        return {"error": f"HTTP {status}: {body}", "latency": latency}
    if stream:
        if any("error" in event for event in body):
            return {"error": str(body), "latency": latency}
        text = "".join(event["choices"][0]["delta"].get("content", "") for event in body if event["choices"])
        tokens = None
    else:
        text, tokens = body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]
    return {"answer": text, "latency": latency, "completion_tokens": tokens}


def run_phase(url: str, requests: list[dict], clients: int, per_client: int) -> tuple[list[dict], float]:
    """`clients` threads, each sending its `per_client` requests one after the other (odd ones streamed)."""
    results = [None] * len(requests)

    def client(number: int):
        for index in range(number * per_client, min((number + 1) * per_client, len(requests))):
            try:
                results[index] = ask(url, requests[index], stream=index % 2 == 1)
            except Exception as error:  # a lost request is counted, not raised
                results[index] = {"error": f"{type(error).__name__}: {error}", "latency": float("nan")}

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def summarize(name: str, results: list[dict], wall: float, reference: list[str], health_before, health_after) -> dict:
    answered = [result for result in results if result and "answer" in result]
    changed = [
        index
        for index, result in enumerate(results)
        if result and "answer" in result and result["answer"] != reference[index]
    ]
    others = set(reference)
    latencies = [result["latency"] for result in answered]
    batches = health_after["batches"] - health_before["batches"]
    served = health_after["requests"] - health_before["requests"]
    return {
        "phase": name,
        "requests": len(results),
        "answered": len(answered),
        "lost": len(results) - len(answered),
        "changed": len(changed),
        "changed_to_another_requests_answer": sum(results[index]["answer"] in others for index in changed),
        "errors": sorted({result["error"] for result in results if result and "error" in result})[:5],
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(answered) / wall, 2),
        "latency_p50_s": round(percentile(latencies, 0.5), 4) if latencies else None,
        "latency_p99_s": round(percentile(latencies, 0.99), 4) if latencies else None,
        "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
        "server_cpu_s": round(health_after["cpu_seconds"] - health_before["cpu_seconds"], 2),
        "server_cpu_ms_per_request": round(
            1000 * (health_after["cpu_seconds"] - health_before["cpu_seconds"]) / max(len(answered), 1), 1
        ),
        "generate_calls": batches,
        "mean_batch": round(served / batches, 2) if batches else None,
        "largest_batch": health_after["largest_batch"],
        "server_peak_rss_mib": health_after["peak_rss_mib"],
        "server_cuda_peak_mib": health_after.get("cuda_peak_mib"),
    }


TABLE_COLUMNS = (
    ("phase", "phase"),
    ("requests", "requests"),
    ("lost", "lost"),
    ("changed", "changed"),
    ("wall_s", "wall s"),
    ("throughput_rps", "req/s"),
    ("latency_p50_s", "p50 s"),
    ("latency_p99_s", "p99 s"),
    ("server_cpu_ms_per_request", "server CPU ms/req"),
    ("generate_calls", "generate calls"),
    ("mean_batch", "mean batch"),
    ("server_peak_rss_mib", "peak RSS MiB"),
)


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |", "|---" * len(TABLE_COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row[key]) for key, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [row["phase"] for row in rows]
    left.bar(names, [row["throughput_rps"] for row in rows], color=["#999", "#2a6fdb", "#e08a1e"][: len(rows)])
    left.set_ylabel("requests / s")
    left.set_title("throughput")
    width = 0.38
    positions = range(len(rows))
    right.bar([p - width / 2 for p in positions], [row["latency_p50_s"] for row in rows], width, label="p50")
    right.bar([p + width / 2 for p in positions], [row["latency_p99_s"] for row in rows], width, label="p99")
    right.set_xticks(list(positions), names)
    right.set_ylabel("latency (s)")
    right.set_title("latency per request")
    right.legend()
    for axes in (left, right):
        axes.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def run(args: argparse.Namespace) -> dict:
    from ..cli_errors import CliError

    if args.clients < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        raise CliError("--clients, --requests-per-client and --max-tokens must be at least 1")
    if args.continuous_batching_check:
        return continuous_batching_check(args.model, args.continuous_batching_check)
    requests = build_requests(args.clients * args.requests_per_client, args.seed, args.max_tokens)
    servers = []
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            process, url = start_server(args.model, args.server_arg)
            servers.append(process)
        _, health = call(url, "GET", "/health")
        one_at_a_time, wall = run_phase(url, requests, 1, len(requests))
        if any("error" in result for result in one_at_a_time):
            raise CliError(f"the one-at-a-time run failed: {[r['error'] for r in one_at_a_time if 'error' in r][:3]}")
        reference = [result["answer"] for result in one_at_a_time]
        _, after = call(url, "GET", "/health")
        rows = [summarize("one at a time", one_at_a_time, wall, reference, health, after)]
        results, wall = run_phase(url, requests, args.clients, args.requests_per_client)
        _, final = call(url, "GET", "/health")
        rows.append(summarize(f"{args.clients} clients, batched", results, wall, reference, after, final))
        if not args.no_unbatched and not args.url:
            process, url = start_server(args.model, [*args.server_arg, "--max-batch-size", "1"])
            servers.append(process)
            _, health = call(url, "GET", "/health")
            results, wall = run_phase(url, requests, args.clients, args.requests_per_client)
            _, final = call(url, "GET", "/health")
            rows.append(summarize(f"{args.clients} clients, batching off", results, wall, reference, health, final))
    finally:
        for process in servers:
            stop_server(process)
    from ..demo import DEMO_MODEL_DIR

    report = {
        "model": "the embedded demo model" if Path(args.model).resolve() == DEMO_MODEL_DIR else args.model,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "clients": args.clients,
        "requests_per_client": args.requests_per_client,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "machine": machine_description(),
        "phases": rows,
        "speedup_batched_vs_one_at_a_time": round(rows[1]["throughput_rps"] / rows[0]["throughput_rps"], 2),
    }
    report["cpu_per_request_one_at_a_time_over_batched"] = round(
        rows[0]["server_cpu_ms_per_request"] / rows[1]["server_cpu_ms_per_request"], 2
    )
    if len(rows) > 2:
        report["speedup_batched_vs_batching_off"] = round(rows[1]["throughput_rps"] / rows[2]["throughput_rps"], 2)
        report["cpu_per_request_batching_off_over_batched"] = round(
            rows[2]["server_cpu_ms_per_request"] / rows[1]["server_cpu_ms_per_request"], 2
        )
    table = format_table(rows)
    print(table)
    print(
        f"batched throughput: {report['speedup_batched_vs_one_at_a_time']}x one at a time"
        + (f", {report['speedup_batched_vs_batching_off']}x batching off" if len(rows) > 2 else "")
        + f"; server CPU per request: one at a time {report['cpu_per_request_one_at_a_time_over_batched']}x batched"
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output + ".json").write_text(json.dumps(report, indent=2) + "\n")
        command = " ".join(["flashsloth serve-bench", *sys.argv[2:]]) if sys.argv[1:2] == ["serve-bench"] else None
        lines = [
            "# Load test of `flashsloth serve`\n",
            f"Command: `{command or 'flashsloth serve-bench'}` on "
            f"{report['machine']} (load average {report['load_average_1min_at_end']} at the end); {args.clients} "
            f"clients x {args.requests_per_client} requests, max_tokens {args.max_tokens}; "
            f"{report['model']}.\n",
            table,
            "",
        ]
        Path(args.output + ".md").write_text("\n".join(lines))
        if plot(rows, args.output + ".png"):
            print(f"wrote {args.output}.md, .json and .png")
        else:
            print(f"wrote {args.output}.md and .json (no matplotlib: no chart)")
    failures = [row for row in rows if row["lost"] or row["changed"]]
    if failures:
        raise CliError(f"lost or changed answers: {[(row['phase'], row['lost'], row['changed']) for row in failures]}")
    return report


def continuous_batching_check(model_dir: str, count: int) -> dict:
    """Greedy answers of `count` image questions from `model.generate_batch` (transformers' continuous batching, which
    takes token ids only) against `model.generate` with the images; how many agree."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    from ..training import synthetic

    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    rng = random.Random("flashsloth-continuous-batching-check")
    prompts, expected = [], []
    for index in range(count):
        scene, record = synthetic.make_sample(index, 2, rng)
        image = synthetic.render_scene(scene, 288, rng)
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        inputs = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True))
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        expected.append(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
        prompts.append(inputs["input_ids"][0].tolist())
    config = GenerationConfig(
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    outputs = model.generate_batch(inputs=prompts, generation_config=config)
    ordered = [outputs[key] for key in sorted(outputs, key=lambda key: int(key.rsplit("_", 1)[-1]))]  # "req_<i>"
    answers = [processor.decode(output.generated_tokens, skip_special_tokens=True).strip() for output in ordered]
    agree = sum(answer == reference for answer, reference in zip(answers, expected))
    print(f"continuous batching agrees with generate on {agree} of {count} answers")
    for answer, reference in list(zip(answers, expected))[:8]:
        print(f"  generate: {reference!r:12} generate_batch: {answer!r}")
    return {"agree": agree, "count": count}


def machine_description() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPU cores"


def main(argv: list[str] | None = None) -> int:
    from ..cli_errors import CliError

    parser = argparse.ArgumentParser(prog="python -m flashsloth.serve.load_test", description=__doc__.strip())
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except CliError as error:
        print(f"load test: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
